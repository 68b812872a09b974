"""Hidden checks of Lab 3: edge cases of the same API (see README.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.checks import Check, assert_close, seeded_generator
from labkit.checks.lab03 import (_attention_weights, _causal_part, _tensor, alibi_reference, hf_apply_rope,
                                 hf_cos_sin, hf_llama_attention, paper_alibi_slopes, sinusoid_table)
from labkit.grade import HiddenCheck


def sinusoidal_edge_inputs(seed: int) -> dict:
    return {"cases": [(1, 2, 10000.0), (7, 10, 10.0), (300, 4, 10000.0)]}


def sinusoidal_edge_collect(inputs, sinusoidal_encoding):
    return {f"pe{n}": sinusoidal_encoding(T, d, base) for n, (T, d, base) in enumerate(inputs["cases"])}


def sinusoidal_edge_verify(inputs: dict, out: dict) -> str:
    for n, (T, d, base) in enumerate(inputs["cases"]):
        what = f"sinusoidal_encoding({T}, {d}, base={base:g})"
        assert_close(what, _tensor(what, out[f"pe{n}"], (T, d)), sinusoid_table(T, d, base), atol=1e-4)
    return "✔ 03.hidden.sinusoidal_edge"


def rope_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"positions": torch.tensor([0, 5, 255, 257, 2049, 8191]), "x2": torch.randn(6, 64, generator=g),
            "x5": torch.randn(2, 1, 3, 6, 2, generator=g)}


def rope_edge_collect(inputs, rope_cos_sin, apply_rope):
    out = {}
    for head_dim, base in ((2, 10000.0), (64, 500000.0)):
        cos, sin = rope_cos_sin(6, head_dim, base, position_ids=inputs["positions"])
        out[f"cos{head_dim}"], out[f"sin{head_dim}"] = cos, sin
    out["rot2d"] = apply_rope(inputs["x2"], out["cos64"], out["sin64"])  # x: (T, d), no batch or head axes
    out["rot5d"] = apply_rope(inputs["x5"], out["cos2"], out["sin2"])    # x: five axes, d = 2
    return out


def rope_edge_verify(inputs: dict, out: dict) -> str:
    positions = inputs["positions"]
    for head_dim, base in ((2, 10000.0), (64, 500000.0)):
        want_cos, want_sin = hf_cos_sin(head_dim, base, positions)
        what = f"rope_cos_sin(6, {head_dim}, base={base:g}, position_ids={positions.tolist()})"
        # float32 angles at position 8191 carry a rounding error of order 1e-3 rad
        assert_close(f"{what}: cos", _tensor(what, out[f"cos{head_dim}"], (6, head_dim)), want_cos, atol=3e-3)
        assert_close(f"{what}: sin", _tensor(what, out[f"sin{head_dim}"], (6, head_dim)), want_sin, atol=3e-3)
    cos64, sin64 = out["cos64"].double(), out["sin64"].double()
    x2 = inputs["x2"].double()
    assert_close("apply_rope on x of shape (T, d) (no batch or head axes)", _tensor("apply_rope", out["rot2d"], x2.shape),
                 hf_apply_rope(x2[None, None], cos64, sin64)[0, 0], atol=1e-5)
    x5 = inputs["x5"].double()
    want = hf_apply_rope(x5.flatten(0, 2), out["cos2"].double(), out["sin2"].double()).view(x5.shape)
    assert_close("apply_rope on x with five axes and head_dim 2", _tensor("apply_rope", out["rot5d"], x5.shape), want, atol=1e-5)
    return "✔ 03.hidden.rope_edge"


def alibi_edge_inputs(seed: int) -> dict:
    return {"counts": [3, 5, 24, 32], "cases": [(1, 1, 1), (6, 2, 5), (3, 4, 4)]}


def alibi_edge_collect(inputs, alibi_slopes, alibi_bias):
    out = {f"h{n}": alibi_slopes(n) for n in inputs["counts"]}
    out |= {f"case{n}": alibi_bias(*case) for n, case in enumerate(inputs["cases"])}
    return out


def alibi_edge_verify(inputs: dict, out: dict) -> str:
    for n in inputs["counts"]:
        assert_close(f"alibi_slopes({n})", _tensor(f"alibi_slopes({n})", out[f"h{n}"], (n,)),
                     torch.tensor(paper_alibi_slopes(n), dtype=torch.float64), atol=1e-6)
    for n, (H, T_q, T_k) in enumerate(inputs["cases"]):
        what = f"alibi_bias({H}, {T_q}, {T_k})"
        keep = _causal_part(T_q, T_k).expand(H, T_q, T_k)
        got = _tensor(what, out[f"case{n}"], (H, T_q, T_k))
        assert_close(what, got[keep], alibi_reference(paper_alibi_slopes(H), T_q, T_k)[keep], atol=1e-5)
    return "✔ 03.hidden.alibi_edge"


def attention_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"w16": _attention_weights(16, g), "w24": _attention_weights(24, g), "x1": torch.randn(2, 1, 16, generator=g),
            "x16": torch.randn(1, 9, 16, generator=g), "x24": torch.randn(2, 5, 24, generator=g)}


def attention_edge_collect(inputs, CausalSelfAttention):
    def run(d_model, n_heads, weights, x, **kwargs):
        attention = CausalSelfAttention(d_model, n_heads, **kwargs)
        attention.load_state_dict(weights)
        with torch.no_grad():
            return attention(x)
    return {"one_token": run(16, 2, inputs["w16"], inputs["x1"], pos="rope"),
            "one_head": run(16, 1, inputs["w16"], inputs["x16"], pos="rope", rope_base=500000.0),
            "scaled": run(16, 2, inputs["w16"], inputs["x16"], pos="rope", rope_scaling={"type": "linear", "factor": 4.0}),
            "alibi6": run(24, 6, inputs["w24"], inputs["x24"], pos="alibi")}


def attention_edge_verify(inputs: dict, out: dict) -> str:
    x1, x16 = inputs["x1"].double(), inputs["x16"].double()
    assert_close("RoPE attention on a single token (vs LlamaAttention)", _tensor("one token", out["one_token"], x1.shape),
                 hf_llama_attention(inputs["w16"], x1, 2, 10000.0), atol=1e-5)
    assert_close("RoPE attention with one head and base 500000 (vs LlamaAttention)",
                 _tensor("one head", out["one_head"], x16.shape), hf_llama_attention(inputs["w16"], x16, 1, 500000.0),
                 atol=1e-5)
    assert_close("RoPE attention with rope_scaling linear, factor 4 (vs LlamaAttention with 'linear' RoPE)",
                 _tensor("scaled", out["scaled"], x16.shape),
                 hf_llama_attention(inputs["w16"], x16, 2, 10000.0, "linear", 4.0), atol=1e-5,
                 hint="pass the layer's rope_scaling to rope_cos_sin")
    x, w = inputs["x24"].double(), {k: v.double() for k, v in inputs["w24"].items()}
    B, T, C = x.shape
    q, k, v = ((x @ w[f"{n}_proj.weight"].T).view(B, T, 6, -1).transpose(1, 2) for n in "qkv")
    mask = alibi_reference(paper_alibi_slopes(6), T, T).masked_fill(~_causal_part(T, T), float("-inf"))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, C) @ w["o_proj.weight"].T
    assert_close("ALiBi attention with 6 heads (vs F.scaled_dot_product_attention)",
                 _tensor("alibi6", out["alibi6"], x.shape), want, atol=1e-5)
    return "✔ 03.hidden.attention_edge"


HIDDEN = [
    HiddenCheck(Check("03.hidden.sinusoidal_edge", sinusoidal_edge_inputs, sinusoidal_edge_collect, sinusoidal_edge_verify),
                ("sinusoidal_encoding",), 1),
    HiddenCheck(Check("03.hidden.rope_edge", rope_edge_inputs, rope_edge_collect, rope_edge_verify),
                ("rope_cos_sin", "apply_rope"), 1),
    HiddenCheck(Check("03.hidden.alibi_edge", alibi_edge_inputs, alibi_edge_collect, alibi_edge_verify),
                ("alibi_slopes", "alibi_bias"), 1),
    HiddenCheck(Check("03.hidden.attention_edge", attention_edge_inputs, attention_edge_collect, attention_edge_verify),
                ("CausalSelfAttention",), 1),
]
