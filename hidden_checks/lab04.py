"""Hidden checks of Lab 4: edge cases of the same API (see README.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.checks import Check, assert_close, seeded_generator
from labkit.checks.lab04 import _block_weights, _reference_block, assert_bf16_close
from labkit.grade import HiddenCheck


def norms_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d = 24
    return {"d": d, "w": 1 + 0.1 * torch.randn(d, generator=g), "b": 0.1 * torch.randn(d, generator=g),
            "x4": torch.randn(2, 3, 4, d, generator=g) * 5,               # four axes
            "x1": torch.randn(d, generator=g),                             # a single vector
            "zeros": torch.zeros(2, d),                                    # eps keeps this finite
            "x_half": (torch.randn(6, d, generator=g) * 100).half()}       # float16: x^2 overflows (> 65504) in fp16


def norms_edge_collect(inputs, LayerNorm, RMSNorm):
    d = inputs["d"]
    ln, rms = LayerNorm(d), RMSNorm(d)
    ln.load_state_dict({"weight": inputs["w"], "bias": inputs["b"]})
    rms.load_state_dict({"weight": inputs["w"]})
    out = {}
    with torch.no_grad():
        for name in ("x4", "x1", "zeros"):
            out[f"ln_{name}"], out[f"rms_{name}"] = ln(inputs[name]), rms(inputs[name])
        rms16 = rms.half()
        out["rms_half"] = rms16(inputs["x_half"])
    return out


def norms_edge_verify(inputs: dict, out: dict) -> str:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    d, w, b = inputs["d"], inputs["w"].double(), inputs["b"].double()
    for name in ("x4", "x1", "zeros"):
        x = inputs[name].double()
        assert_close(f"LayerNorm({d}) on an input of shape {tuple(x.shape)}", out[f"ln_{name}"],
                     F.layer_norm(x, (d,), w, b, eps=1e-5), atol=1e-4)
        assert_close(f"RMSNorm({d}) on an input of shape {tuple(x.shape)}", out[f"rms_{name}"],
                     F.rms_norm(x, (d,), w, eps=1e-6), atol=1e-4)
    llama = LlamaRMSNorm(d, eps=1e-6).half()
    llama.load_state_dict({"weight": inputs["w"]})
    with torch.no_grad():
        want = llama(inputs["x_half"])
    assert_bf16_close("RMSNorm in float16 on values up to a few hundred (vs LlamaRMSNorm: mean(x^2) overflows unless "
                      "computed in float32)", out["rms_half"], want)
    return "✔ 04.hidden.norms_edge"


def swiglu_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model, d_ff = 8, 3  # a hidden width narrower than the model
    return {"weights": {"gate_proj.weight": torch.randn(d_ff, d_model, generator=g),
                        "up_proj.weight": torch.randn(d_ff, d_model, generator=g),
                        "down_proj.weight": torch.randn(d_model, d_ff, generator=g)},
            "x": torch.randn(2, 3, 4, d_model, generator=g), "d_model": d_model, "d_ff": d_ff}


def swiglu_edge_collect(inputs, SwiGLU, swiglu_hidden_dim):
    mlp = SwiGLU(inputs["d_model"], inputs["d_ff"])
    mlp.load_state_dict(inputs["weights"])
    with torch.no_grad():
        out = {"out": mlp(inputs["x"])}
    out["dims"] = [swiglu_hidden_dim(d, multiple_of=m, ffn_dim_multiplier=f)
                   for d, m, f in ((768, 256, None), (2048, 256, None), (3072, 256, 1.0), (5120, 1024, 1.3), (96, 8, None))]
    return out


def swiglu_edge_verify(inputs: dict, out: dict) -> str:
    w = {k: v.double() for k, v in inputs["weights"].items()}
    x = inputs["x"].double()
    want = F.linear(F.silu(F.linear(x, w["gate_proj.weight"])) * F.linear(x, w["up_proj.weight"]), w["down_proj.weight"])
    assert_close("SwiGLU(8, 3) on a 4-D input", out["out"], want, atol=1e-4)
    # int(8d/3), times the multiplier (int), rounded up: 2048, 5632 (TinyLlama 1.1B's published size), 8192, 18432, 256
    expected = [2048, 5632, 8192, 18432, 256]
    if list(out["dims"]) != expected:
        raise AssertionError(f"swiglu_hidden_dim on (768, 256), (2048, 256), (3072, 256, 1.0), (5120, 1024, 1.3), "
                             f"(96, 8): got {list(out['dims'])}, expected {expected}")
    return "✔ 04.hidden.swiglu_edge"


def block_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model = 12
    cases = [{"norm": "post", "norm_type": "rms", "ffn": "swiglu", "d_ff": 20, "n_heads": 1},
             {"norm": "pre", "norm_type": "layer", "ffn": "gelu", "d_ff": 36, "n_heads": 12}]
    for case in cases:
        case["weights"] = _block_weights(d_model, case["norm_type"], case["ffn"], case["d_ff"], g)
    return {"d_model": d_model, "cases": cases, "x1": torch.randn(3, 1, d_model, generator=g),
            "x": torch.randn(1, 9, d_model, generator=g)}


def block_edge_collect(inputs, Block):
    out = {}
    for i, case in enumerate(inputs["cases"]):
        block = Block(inputs["d_model"], case["n_heads"], norm=case["norm"], norm_type=case["norm_type"],
                      ffn=case["ffn"], d_ff=case["d_ff"])
        block.load_state_dict(case["weights"])
        with torch.no_grad():
            out[f"one{i}"], out[f"seq{i}"] = block(inputs["x1"]), block(inputs["x"])
    return out


def block_edge_verify(inputs: dict, out: dict) -> str:
    d_model = inputs["d_model"]
    for i, case in enumerate(inputs["cases"]):
        for name, x in (("one", inputs["x1"]), ("seq", inputs["x"])):
            assert_close(f"Block({d_model}, {case['n_heads']}, norm={case['norm']!r}, ffn={case['ffn']!r}) on "
                         f"{tuple(x.shape)}", out[f"{name}{i}"],
                         _reference_block(case, x.double(), d_model, case["n_heads"]), atol=1e-4)
    return "✔ 04.hidden.block_edge"


HIDDEN = [
    HiddenCheck(Check("04.hidden.norms_edge", norms_edge_inputs, norms_edge_collect, norms_edge_verify),
                ("LayerNorm", "RMSNorm"), 1),
    HiddenCheck(Check("04.hidden.swiglu_edge", swiglu_edge_inputs, swiglu_edge_collect, swiglu_edge_verify),
                ("SwiGLU", "swiglu_hidden_dim"), 1),
    HiddenCheck(Check("04.hidden.block_edge", block_edge_inputs, block_edge_collect, block_edge_verify),
                ("Block",), 1),
]
