"""Hidden checks of Lab 1a: edge cases of the same API (see README.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.checks import attention_weights, compare, define_hidden, seeded_generator, table_inputs
from labkit.checks.lab01a import ATTENTION_BUILTINS, GPT_CONFIG, mha


def sdpa_shapes_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    # Values of another width than queries and keys; a single query; five leading axes.
    return {"q": torch.randn(2, 3, 1, 8, generator=g), "k": torch.randn(2, 3, 6, 8, generator=g),
            "v": torch.randn(2, 3, 6, 3, generator=g),
            "q5": torch.randn(2, 1, 2, 1, 4, 5, generator=g), "k5": torch.randn(2, 1, 2, 1, 4, 5, generator=g)}


def sdpa_shapes_collect(inputs, scaled_dot_product_attention):
    out, _ = scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"])
    out5, _ = scaled_dot_product_attention(inputs["q5"], inputs["k5"], inputs["k5"])
    return {"out": out, "out5": out5}


@define_hidden("01a.hidden.sdpa_shapes", ("scaled_dot_product_attention",), sdpa_shapes_inputs, sdpa_shapes_collect,
               forbid=ATTENTION_BUILTINS)
def sdpa_shapes(inputs: dict, out: dict) -> None:
    q, k, v, q5, k5 = (inputs[n].double() for n in ("q", "k", "v", "q5", "k5"))
    compare("sdpa with values narrower than keys (d_v = 3, d_k = 8), one query", out["out"],
            F.scaled_dot_product_attention(q, k, v), hint="scale by the keys' dimension, not the values'")
    compare("sdpa with five leading axes", out["out5"], F.scaled_dot_product_attention(q5, k5, k5))


def mha_edge_cases(g: torch.Generator) -> list[dict]:
    x, context = torch.randn(1, 1, 12, generator=g), torch.randn(1, 9, 12, generator=g)
    return [{"what": f"cross-attention with {h} head(s), one query and nine keys", "init": [12, h],
             "weights": attention_weights("", 12, g), "args": [x], "kwargs": {"context": context}} for h in (1, 12)]


mha_edge = mha.variant("01a.hidden.mha_edge", table_inputs(mha_edge_cases), ("MultiHeadAttention",))


def generate_edge_inputs(seed: int) -> dict:
    prompt = torch.randint(50, (1, 16), generator=seeded_generator(seed))  # exactly max_len tokens
    return {"config": dict(GPT_CONFIG), "seed": seed, "prompt": prompt}


def generate_edge_collect(inputs, GPT, generate):
    torch.manual_seed(inputs["seed"])
    model = GPT(**inputs["config"]).eval()
    with torch.no_grad():
        return {"full": model(inputs["prompt"]),  # a prompt of exactly max_len tokens
                "none": generate(model, inputs["prompt"], 0), "one": generate(model, inputs["prompt"], 1, top_k=1)}


@define_hidden("01a.hidden.generate_edge", ("GPT", "generate"), generate_edge_inputs, generate_edge_collect)
def generate_edge(inputs: dict, out: dict) -> None:
    prompt = inputs["prompt"]
    if tuple(getattr(out["full"], "shape", ())) != (1, 16, GPT_CONFIG["vocab_size"]):
        raise AssertionError("GPT on a sequence of exactly max_len tokens must give (1, max_len, vocab_size) logits")
    if not torch.equal(out["none"], prompt):
        raise AssertionError("generate(model, idx, 0) must return idx unchanged")
    if not torch.equal(out["one"][:, -1], out["full"][:, -1].argmax(-1)):
        raise AssertionError("greedy generation from a prompt of max_len tokens picked a token that is not the argmax")
