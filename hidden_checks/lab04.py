"""Hidden checks of Lab 4: edge cases of the same API (see README.md)."""
from __future__ import annotations

import torch

from labkit.checks import define_hidden, mlp_weights, norm_weights, seeded_generator, table_inputs
from labkit.checks.kernel import run_cases
from labkit.checks.lab04 import NORM_BUILTINS, block, block_case, layernorm, swiglu, swiglu_hidden_dim


def norms_edge_cases(g: torch.Generator) -> list[dict]:
    w = norm_weights("", 24, g)
    inputs = {"a 4-D input": 5 * torch.randn(2, 3, 4, 24, generator=g), "a single vector": torch.randn(24, generator=g),
              "zeros (eps keeps the output finite)": torch.zeros(2, 24),
              "float16 values of a few hundred (x^2 overflows in float16)": (100 * torch.randn(6, 24, generator=g)).half()}
    half = {"dtype": torch.half, "max_share": 0.01}  # the module cast to float16, compared in ulps
    return [{"what": f"{name}(24) on {what}", "student": i, "init": [24], "weights": [w, {"weight": w["weight"]}][i],
             "eps": [1e-5, 1e-6][i], "args": [x], "atol": 1e-4} | (half if x.dtype == torch.half else {})
            for i, name in enumerate(("LayerNorm", "RMSNorm")) for what, x in inputs.items()]


@define_hidden("04.hidden.norms_edge", ("LayerNorm", "RMSNorm"), table_inputs(norms_edge_cases), run_cases,
               forbid=NORM_BUILTINS)
def norms_edge(inputs: dict, out: dict) -> None:
    layernorm.verify(inputs, out)  # its reference and suspects tell the two norms apart by the bias


def swiglu_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    # int(8d/3), times the multiplier (int), rounded up; 5632 is TinyLlama 1.1B's published size
    dims = [(768, 256, None, 2048), (2048, 256, None, 5632), (3072, 256, 1.0, 8192), (5120, 1024, 1.3, 18432), (96, 8, None, 256)]
    return {"mlp": {"cases": [{"what": "SwiGLU(8, 3), narrower than the model, on a 4-D input", "init": [8, 3], "atol": 1e-4,
                               "weights": mlp_weights("", 8, 3, g, gated=True), "args": [torch.randn(2, 3, 4, 8, generator=g)]}]},
            "dims": {"cases": [{"what": f"swiglu_hidden_dim({d}, multiple_of={m}, ffn_dim_multiplier={f})", "args": [d],
                                "kwargs": {"multiple_of": m, "ffn_dim_multiplier": f}, "want": want} for d, m, f, want in dims]}}


def swiglu_edge_collect(inputs, SwiGLU, swiglu_hidden_dim):
    return {"mlp": run_cases(inputs["mlp"], SwiGLU), "dims": run_cases(inputs["dims"], swiglu_hidden_dim)}


@define_hidden("04.hidden.swiglu_edge", ("SwiGLU", "swiglu_hidden_dim"), swiglu_edge_inputs, swiglu_edge_collect,
               forbid=swiglu.forbid)
def swiglu_edge(inputs: dict, out: dict) -> None:
    swiglu.verify(inputs["mlp"], out["mlp"])
    swiglu_hidden_dim.verify(inputs["dims"], out["dims"])


def block_edge_cases(g: torch.Generator) -> list[dict]:
    one, seq = torch.randn(3, 1, 12, generator=g), torch.randn(1, 9, 12, generator=g)  # one token; 1 and 12 heads
    cases = [block_case(g, 12, 1, "post", "rms", "swiglu", 20), block_case(g, 12, 12, "pre", "layer", "gelu", 36)]
    return [c | {"what": f"{c['what']} on {tuple(x.shape)}", "args": [x]} for c in cases for x in (one, seq)]


block_edge = block.variant("04.hidden.block_edge", table_inputs(block_edge_cases), ("Block",))
