"""Hidden checks of Lab 1a: edge cases of the same API (see README.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.checks import Check, assert_close, seeded_generator
from labkit.checks.lab01a import GPT_CONFIG
from labkit.grade import HiddenCheck


def sdpa_shapes_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    # Values of another width than queries and keys; a single query; five leading axes.
    return {"q": torch.randn(2, 3, 1, 8, generator=g), "k": torch.randn(2, 3, 6, 8, generator=g),
            "v": torch.randn(2, 3, 6, 3, generator=g),
            "q5": torch.randn(2, 1, 2, 1, 4, 5, generator=g), "k5": torch.randn(2, 1, 2, 1, 4, 5, generator=g)}


def sdpa_shapes_collect(inputs, scaled_dot_product_attention):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    out, weights = scaled_dot_product_attention(q, k, v)
    out5, _ = scaled_dot_product_attention(inputs["q5"], inputs["k5"], inputs["k5"])
    return {"out": out, "weights": weights, "out5": out5}


def sdpa_shapes_verify(inputs: dict, out: dict) -> str:
    q, k, v = (inputs[n].double() for n in "qkv")
    assert_close("sdpa with values narrower than keys (d_v = 3, d_k = 8), one query", out["out"],
                 F.scaled_dot_product_attention(q, k, v), hint="scale by the keys' dimension, not the values'")
    q5, k5 = inputs["q5"].double(), inputs["k5"].double()
    assert_close("sdpa with five leading axes", out["out5"], F.scaled_dot_product_attention(q5, k5, k5))
    return "✔ 01a.hidden.sdpa_shapes"


def mha_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model = 12
    weights = {}
    for n_heads in (1, 12):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            weights[f"h{n_heads}.{name}.weight"] = torch.randn(d_model, d_model, generator=g) / 4
            weights[f"h{n_heads}.{name}.bias"] = 0.1 * torch.randn(d_model, generator=g)
    return {"d_model": d_model, "weights": weights, "x": torch.randn(1, 1, d_model, generator=g),
            "context": torch.randn(1, 9, d_model, generator=g)}


def mha_edge_collect(inputs, MultiHeadAttention):
    out = {}
    for n_heads in (1, 12):
        mha = MultiHeadAttention(inputs["d_model"], n_heads)
        prefix = f"h{n_heads}."
        mha.load_state_dict({k[len(prefix):]: v for k, v in inputs["weights"].items() if k.startswith(prefix)})
        with torch.no_grad():
            out[f"h{n_heads}"] = mha(inputs["x"], context=inputs["context"])
    return out


def mha_edge_verify(inputs: dict, out: dict) -> str:
    from labkit.checks.lab01a import _reference_mha

    x, context = inputs["x"].double(), inputs["context"].double()
    for n_heads in (1, 12):
        ref = _reference_mha(inputs["weights"], f"h{n_heads}.", inputs["d_model"], n_heads)
        with torch.no_grad():
            want = ref(x, context, context, need_weights=False)[0]
        assert_close(f"cross-attention with {n_heads} head(s), one query and nine keys", out[f"h{n_heads}"], want)
    return "✔ 01a.hidden.mha_edge"


def generate_edge_inputs(seed: int) -> dict:
    return {"config": dict(GPT_CONFIG), "seed": seed, "prompt": torch.randint(50, (1, 16), generator=seeded_generator(seed))}


def generate_edge_collect(inputs, GPT, generate):
    torch.manual_seed(inputs["seed"])
    model = GPT(**inputs["config"]).eval()
    with torch.no_grad():
        full = model(inputs["prompt"])  # a prompt of exactly max_len tokens
        none = generate(model, inputs["prompt"], 0)
        one = generate(model, inputs["prompt"], 1, top_k=1)
    return {"full": full, "none": none, "one": one}


def generate_edge_verify(inputs: dict, out: dict) -> str:
    prompt = inputs["prompt"]
    if tuple(getattr(out["full"], "shape", ())) != (1, 16, GPT_CONFIG["vocab_size"]):
        raise AssertionError("GPT on a sequence of exactly max_len tokens must give (1, max_len, vocab_size) logits")
    if not torch.equal(out["none"], prompt):
        raise AssertionError("generate(model, idx, 0) must return idx unchanged")
    if not torch.equal(out["one"][:, -1], out["full"][:, -1].argmax(-1)):
        raise AssertionError("greedy generation from a prompt of max_len tokens picked a token that is not the argmax")
    return "✔ 01a.hidden.generate_edge"


HIDDEN = [
    HiddenCheck(Check("01a.hidden.sdpa_shapes", sdpa_shapes_inputs, sdpa_shapes_collect, sdpa_shapes_verify),
                ("scaled_dot_product_attention",), 1),
    HiddenCheck(Check("01a.hidden.mha_edge", mha_edge_inputs, mha_edge_collect, mha_edge_verify),
                ("MultiHeadAttention",), 1),
    HiddenCheck(Check("01a.hidden.generate_edge", generate_edge_inputs, generate_edge_collect, generate_edge_verify),
                ("GPT", "generate"), 1),
]
