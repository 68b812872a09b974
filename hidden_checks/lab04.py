"""Hidden checks of Lab 4: edge cases of the same API (see README.md)."""

import torch

from labkit.checks import define_hidden, mlp_weights, norm_weights, table_inputs
from labkit.checks.lab04 import block, block_case, hidden_dim_cases, layernorm, swiglu, swiglu_hidden_dim


def norms_edge_cases(g: torch.Generator) -> list[dict]:  # 04.layernorm's verify tells the norms apart by the bias
    w = norm_weights("", 24, g)
    inputs = {"a 4-D input": 5 * torch.randn(2, 3, 4, 24, generator=g), "a single vector": torch.randn(24, generator=g),
              "zeros (eps keeps the output finite)": torch.zeros(2, 24),
              "float16 values in the hundreds (x^2 overflows float16)": (100 * torch.randn(6, 24, generator=g)).half()}
    half = {"dtype": torch.half, "max_share": 0.01}  # the module cast to float16, compared in ulps
    return [{"what": f"{name}(24) on {what}", "student": i, "init": [24], "weights": [w, {"weight": w["weight"]}][i],
             "eps": [1e-5, 1e-6][i], "args": [x], "atol": 1e-4} | (half if x.dtype == torch.half else {})
            for i, name in enumerate(("LayerNorm", "RMSNorm")) for what, x in inputs.items()]


norms_edge = layernorm.variant("04.hidden.norms_edge", table_inputs(norms_edge_cases), ("LayerNorm", "RMSNorm"))


def swiglu_edge_cases(g: torch.Generator) -> list[dict]:
    mlp = {"what": "SwiGLU(8, 3), narrower than the model, on a 4-D input", "init": [8, 3], "atol": 1e-4,
           "weights": mlp_weights("", 8, 3, g, gated=True), "args": [torch.randn(2, 3, 4, 8, generator=g)]}
    sizes = [(768, 256, None, 2048), (2048, 256, None, 5632), (3072, 256, 1.0, 8192), (5120, 1024, 1.3, 18432),
             (96, 8, None, 256)]  # 5632: TinyLlama 1.1B's published size
    return [mlp] + [case | {"student": 1} for case in hidden_dim_cases(sizes)]


@define_hidden("04.hidden.swiglu_edge", ("SwiGLU", "swiglu_hidden_dim"), table_inputs(swiglu_edge_cases),
               swiglu.collect, forbid=swiglu.forbid)
def swiglu_edge(inputs: dict, out: dict) -> None:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):  # student 1: swiglu_hidden_dim
        (swiglu_hidden_dim if case.get("student") else swiglu).verify({"cases": [case]}, {"outputs": [got]})


block_edge = block.variant("04.hidden.block_edge", table_inputs(lambda g: [  # one token, or nine; 1 head, or 12
    block_case(g, shape, *config) for config in ((1, "post", "rms", "swiglu", 20), (12, "pre", "layer", "gelu", 36))
    for shape in ((3, 1, 12), (1, 9, 12))]), ("Block",))
