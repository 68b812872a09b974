"""Hidden checks of Lab 1a: edge cases of the same API (see README.md)."""

import torch
import torch.nn.functional as F

from labkit.checks import as_tensor, attention_weights, compare, define_hidden, seeded_generator, table_inputs
from labkit.checks.lab01a import ATTENTION_BUILTINS, GPT_CONFIG, mha


def sdpa_shapes_inputs(seed: int) -> dict:  # (q, k, v): a single query and values of another width; five leading axes
    g = seeded_generator(seed)
    return {"narrow": [torch.randn(shape, generator=g) for shape in ((2, 3, 1, 8), (2, 3, 6, 8), (2, 3, 6, 3))],
            "5-D": [torch.randn(2, 1, 2, 1, 4, 5, generator=g) for _ in "qkv"]}


def sdpa_shapes_collect(inputs, scaled_dot_product_attention):
    return {name: scaled_dot_product_attention(*qkv)[0] for name, qkv in inputs.items()}


@define_hidden("01a.hidden.sdpa_shapes", ("scaled_dot_product_attention",), sdpa_shapes_inputs, sdpa_shapes_collect,
               forbid=ATTENTION_BUILTINS)
def sdpa_shapes(inputs: dict, out: dict) -> None:
    sdpa = lambda name: F.scaled_dot_product_attention(*(t.double() for t in inputs[name]))
    compare("sdpa with values narrower than keys (d_v = 3, d_k = 8), one query", out["narrow"], sdpa("narrow"),
            hint="scale by the keys' dimension, not the values'")
    compare("sdpa with five leading axes", out["5-D"], sdpa("5-D"))


mha_edge = mha.variant("01a.hidden.mha_edge", table_inputs(lambda g: [
    {"what": f"cross-attention with {h} head(s), one query and nine keys", "init": [12, h],
     "weights": attention_weights("", 12, g), "args": [x], "kwargs": {"context": context}}
    for x, context in [(torch.randn(1, 1, 12, generator=g), torch.randn(1, 9, 12, generator=g))] for h in (1, 12)]),
    ("MultiHeadAttention",))


def generate_edge_collect(inputs, GPT, generate):
    torch.manual_seed(inputs["seed"])
    model = GPT(**inputs["config"]).eval()
    with torch.no_grad():
        return {"full": model(inputs["prompt"]),  # a prompt of exactly max_len tokens
                "none": generate(model, inputs["prompt"], 0), "one": generate(model, inputs["prompt"], 1, top_k=1)}


@define_hidden("01a.hidden.generate_edge", ("GPT", "generate"), lambda seed: {
    "config": dict(GPT_CONFIG), "seed": seed, "prompt": torch.randint(50, (1, 16), generator=seeded_generator(seed))},
    generate_edge_collect)
def generate_edge(inputs: dict, out: dict) -> None:
    logits = as_tensor("GPT on a sequence of max_len tokens", out["full"], (1, 16, GPT_CONFIG["vocab_size"]))
    compare("generate(model, idx, 0), which must return idx unchanged", out["none"], inputs["prompt"], 0)
    compare("greedy generation from a prompt of max_len tokens: the new token vs the argmax of the last logits",
            out["one"][:, -1], logits[:, -1].argmax(-1), 0)
