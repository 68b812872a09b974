"""Checks of Lab 1a: attention and a decoder-only Transformer.

References: ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``, ``F.layer_norm`` and
``F.gelu``; closed-form properties (causality, a parameter count, ln V at initialisation) and the
statistics of sampling.
"""

import math

import torch
import torch.nn.functional as F

from labkit.checks import (as_tensor, attention_weights, causal, compare, define, mlp_weights, norm_weights,
                           seeded_generator, table)
from labkit.checks import references as ref
from labkit.checks.kernel import FixedLogits, attempt, build

ATTENTION_BUILTINS = ("F.scaled_dot_product_attention", "nn.MultiheadAttention", "labkit.nn")


# ---------------------------------------------------------------- scaled dot-product attention
def sdpa_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    B, H, T_q, T_k, d = 2, 3, 5, 7, 8
    mask = torch.rand(B, H, T_q, T_k, generator=g) > 0.4
    mask[..., 0] = True  # every query may attend somewhere
    return {"q": torch.randn(B, H, T_q, d, generator=g), "k": torch.randn(B, H, T_k, d, generator=g),
            "v": torch.randn(B, H, T_k, d, generator=g), "mask": mask, "causal": causal(5), "big": 3000.0}


def sdpa_collect(inputs: dict, scaled_dot_product_attention) -> dict:
    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["mask"]
    out = {}
    out["plain"], out["plain_w"] = scaled_dot_product_attention(q, k, v)
    out["masked"], out["masked_w"] = scaled_dot_product_attention(q, k, v, mask)
    out["bcast"], _ = scaled_dot_product_attention(q[..., :5, :], k[..., :5, :], v[..., :5, :], inputs["causal"])
    out["3d"], _ = scaled_dot_product_attention(q[0], k[0], v[0])
    out["big"], _ = scaled_dot_product_attention(q * inputs["big"], k * inputs["big"], v)
    return out


@define("01a.sdpa", sdpa_inputs, sdpa_collect, forbid=ATTENTION_BUILTINS)
def sdpa(inputs: dict, out: dict) -> str:
    q, k, v = (inputs[n].double() for n in "qkv")
    mask, big, sdpa = inputs["mask"], inputs["big"], F.scaled_dot_product_attention
    rows = as_tensor("attention weights", out["plain_w"]).sum(-1)
    compare("attention weights: the sum of each row", rows, torch.ones_like(rows),
            hint="rows must sum to 1: take the softmax over the last axis (the keys), dim=-1")
    compare("sdpa without mask (vs F.scaled_dot_product_attention)", out["plain"], sdpa(q, k, v),
            suspects={"this is attention with NO 1/sqrt(d) scaling: divide the scores q @ k^T by sqrt(d) before "
                      "the softmax": lambda: sdpa(q, k, v, scale=1.0)})
    compare("sdpa with a boolean mask (True = may attend)", out["masked"], sdpa(q, k, v, attn_mask=mask),
            hint="True in the mask means 'may attend'; fill the scores where the mask is False with -inf")
    compare("attention weights on the keys the mask forbids", as_tensor("weights", out["masked_w"], mask.shape)[~mask],
            torch.zeros(int((~mask).sum()), dtype=torch.float64), atol=1e-6)
    qs, ks, vs = q[..., :5, :], k[..., :5, :], v[..., :5, :]
    compare("sdpa with a (T_q, T_k) mask broadcast over batch and heads", out["bcast"],
            sdpa(qs, ks, vs, attn_mask=inputs["causal"]))
    compare("sdpa on 3-D inputs (no head axis)", out["3d"], sdpa(q[0], k[0], v[0]))
    compare(f"sdpa with logits around 1e4 (q and k scaled by {big:g})", out["big"], sdpa(q * big, k * big, v),
            atol=1e-4, hint="subtract the row maximum before exponentiating, or use torch.softmax, which does")
    return "matches F.scaled_dot_product_attention with and without masks; rows sum to 1; stable at large logits"


# ---------------------------------------------------------------- causal mask
def causal_inputs(seed: int) -> dict:
    return {"sizes": [1, 4, 9]}


def causal_collect(inputs: dict, causal_mask) -> dict:
    return {f"mask{T}": causal_mask(T) for T in inputs["sizes"]}


@define("01a.causal_mask", causal_inputs, causal_collect)
def causal_mask(inputs: dict, out: dict) -> str:
    g = seeded_generator(0)
    for T in inputs["sizes"]:
        mask = out[f"mask{T}"]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (T, T):
            got = f"{getattr(mask, 'dtype', type(mask).__name__)} of shape {tuple(getattr(mask, 'shape', ()))}"
            raise AssertionError(f"causal_mask({T}) must be a ({T}, {T}) bool tensor, got {got}")
        # Behaviour: change key and value j; the outputs at i < j must not move, and those at i >= j must.
        q, k, v = (torch.randn(1, 1, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
        base = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        moved = torch.zeros(T, T, dtype=torch.bool)  # moved[i, j]: output i changes when token j changes
        for j in range(T):
            k2, v2 = k.clone(), v.clone()
            k2[..., j, :] += 1.0
            v2[..., j, :] += 1.0
            moved[:, j] = (F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask) - base).abs().amax(-1)[0, 0] > 1e-9
        for i, j in torch.nonzero(moved & ~causal(T)).tolist()[:1]:
            raise AssertionError(f"causal_mask({T}) lets position {i} see position {j} (a future token)")
        for i, j in torch.nonzero(~moved & causal(T)).tolist()[:1]:
            raise AssertionError(f"causal_mask({T}) hides position {j} from position {i}: "
                                 "a token must see itself and every earlier token")
    return "no position sees the future, and every position sees itself and its past"


# ---------------------------------------------------------------- multi-head attention
def mha_cases(g: torch.Generator) -> list[dict]:
    d_model, n_heads = 16, 4
    module = {"init": [d_model, n_heads], "weights": attention_weights("", d_model, g),
              "args": [torch.randn(2, 5, d_model, generator=g)]}
    heads = "split d_model into heads with .view(B, T, H, d).transpose(1, 2), and merge them back the same way"
    return [module | {"what": "self-attention (vs nn.MultiheadAttention with the same weights)", "hint": heads},
            module | {"what": "masked self-attention (causal mask)", "kwargs": {"mask": causal(5)}, "hint": heads},
            module | {"what": "cross-attention (queries from x, keys and values from context)",
                      "kwargs": {"context": torch.randn(2, 7, d_model, generator=g)},
                      "hint": "in cross-attention, k and v are projections of the context, q of x"}]


mha = table("01a.mha", mha_cases,
            lambda c: ref.mha(c["weights"], "", c["args"][0], c["init"][1], **c.get("kwargs", {})),
            "matches nn.MultiheadAttention for self-, masked and cross-attention", forbid=ATTENTION_BUILTINS)


# ---------------------------------------------------------------- feed-forward and decoder block
def block_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model, n_heads, d_ff = 16, 4, 40
    weights = norm_weights("ln1", d_model, g) | norm_weights("ln2", d_model, g) | attention_weights("attn", d_model, g)
    return {"d_model": d_model, "n_heads": n_heads, "d_ff": d_ff, "ffn": mlp_weights("", d_model, d_ff, g),
            "block": weights | mlp_weights("ffn", d_model, d_ff, g), "x": torch.randn(2, 6, d_model, generator=g)}


def block_collect(inputs: dict, FeedForward, DecoderBlock) -> dict:
    ffn = build(FeedForward, inputs["ffn"], "FeedForward", inputs["d_model"], inputs["d_ff"])
    block = build(DecoderBlock, inputs["block"], "DecoderBlock", inputs["d_model"], inputs["n_heads"], inputs["d_ff"])
    with torch.no_grad():
        return {"ffn": ffn(inputs["x"]), "block": block(inputs["x"])}


@define("01a.block", block_inputs, block_collect, forbid=ATTENTION_BUILTINS)
def block(inputs: dict, out: dict) -> str:
    x = inputs["x"]
    compare("FeedForward (Linear -> GELU -> Linear)", out["ffn"], ref.ffn(inputs["ffn"], "", x),
            hint="use the exact GELU (F.gelu / nn.GELU default), between fc1 and fc2")
    case = {"norm": "pre", "norm_type": "layer", "ffn": "gelu", "weights": inputs["block"]}
    compare("DecoderBlock (pre-norm: x + attn(ln1(x)) with a causal mask, then x + ffn(ln2(x)))", out["block"],
            ref.block(case, x, inputs["n_heads"], norms=("ln1", "ln2"), bias=True),
            hint="pre-norm normalises the input of each sublayer, not the residual sum; the block's self-attention "
                 "is causal")
    return "FeedForward and the pre-norm DecoderBlock match a reference built from PyTorch modules"


# ---------------------------------------------------------------- GPT
GPT_CONFIG = {"vocab_size": 50, "d_model": 32, "n_heads": 4, "n_layers": 2, "max_len": 16}


def gpt_weights(config: dict, g: torch.Generator) -> dict:
    """Lab 1a's GPT weights, larger than its initialisation so that every bug shows, the output tied."""
    d, w = config["d_model"], {}
    for i in range(config["n_layers"]):
        w |= (norm_weights(f"blocks.{i}.ln1", d, g) | attention_weights(f"blocks.{i}.attn", d, g)
              | norm_weights(f"blocks.{i}.ln2", d, g) | mlp_weights(f"blocks.{i}.ffn", d, 4 * d, g))
    # Embeddings of std 0.3: logits of a few units, where float32 stays well within 1e-5 of float64
    embeddings = {"tok_emb.weight": 0.3 * torch.randn(config["vocab_size"], d, generator=g),
                  "pos_emb.weight": 0.3 * torch.randn(config["max_len"], d, generator=g)}
    return embeddings | w | norm_weights("ln_f", d, g) | {"lm_head.weight": embeddings["tok_emb.weight"]}


def gpt_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    V, L = GPT_CONFIG["vocab_size"], GPT_CONFIG["max_len"]
    return {"config": dict(GPT_CONFIG), "weights": gpt_weights(GPT_CONFIG, g), "idx": torch.randint(V, (3, 12), generator=g),
            "future": torch.randint(V, (3, 12), generator=g), "full": torch.randint(V, (2, L), generator=g)}


def gpt_collect(inputs: dict, GPT) -> dict:
    model = build(GPT, inputs["weights"], "GPT", **inputs["config"])
    idx, future = inputs["idx"], inputs["future"]
    with torch.no_grad():
        # For each t, replace the tokens after position t by other tokens.
        changed = [model(torch.cat([idx[:, :t + 1], future[:, t + 1:]], dim=1)) for t in range(idx.shape[1])]
        return {"logits": model(idx), "changed": torch.stack(changed), "short": model(idx[:, :1]),
                "full": model(inputs["full"])}


@define("01a.gpt", gpt_inputs, gpt_collect)
def gpt(inputs: dict, out: dict) -> str:
    c, idx = inputs["config"], inputs["idx"]
    (B, T), V = idx.shape, c["vocab_size"]
    for name, shape in (("logits", (B, T, V)), ("short", (B, 1, V))):
        as_tensor(f"GPT(idx) for idx of shape {(B, shape[1])}: logits (batch, time, vocab_size)", out[name], shape)
    for t in range(T - 1):
        diff = (out["changed"][t][:, :t + 1] - out["logits"][:, :t + 1]).abs().amax(dim=(0, 2))
        if diff.max() > 1e-5:
            i = int(torch.nonzero(diff > 1e-5)[0])
            raise AssertionError(f"GPT is not causal: the logits at position {i} change when the tokens after "
                                 f"position {t} change (by up to {diff.max().item():.3g})")
    for name, tokens in (("logits", idx), ("full", inputs["full"])):
        compare(f"GPT's logits for idx of shape {tuple(tokens.shape)} (vs transformers' GPT2LMHeadModel with the same "
                "weights)", out[name], ref.gpt2_logits(c, inputs["weights"], tokens),
                hint="token + position embeddings, the blocks, ln_f, then lm_head (tied to the token embedding)",
                suspects={f"this is GPT-2 with {bug}: {why}": lambda bug=bug: ref.gpt2_logits(c, inputs["weights"], tokens, bug)
                          for bug, why in (("no positions", "add pos_emb(positions) to the token embeddings"),
                                           ("positions from tokens", "index pos_emb with the positions 0 .. T-1"),
                                           ("no blocks", "run x through every block"),
                                           ("no final norm", "apply ln_f before lm_head"))})
    return "matches transformers' GPT2LMHeadModel with the same weights, and no position's logits depend on later tokens"


def reference_param_count(vocab_size: int, d_model: int, n_layers: int, max_len: int) -> int:
    """Closed form for the lab's GPT: tied embeddings, biases everywhere, d_ff = 4 d_model."""
    per_block = 12 * d_model ** 2 + 13 * d_model
    return vocab_size * d_model + max_len * d_model + n_layers * per_block + 2 * d_model


def param_count_inputs(seed: int) -> dict:
    other = {"vocab_size": 65, "d_model": 48, "n_heads": 6, "n_layers": 3, "max_len": 128}
    return {"configs": [dict(GPT_CONFIG), other]}


def param_count_collect(inputs: dict, GPT, gpt_param_count) -> dict:
    out = {}
    for i, c in enumerate(inputs["configs"]):
        out[f"model{i}"] = sorted(p.numel() for p in GPT(**c).parameters())
        out[f"formula{i}"] = gpt_param_count(c["vocab_size"], c["d_model"], c["n_layers"], c["max_len"])
    return out


@define("01a.param_count", param_count_inputs, param_count_collect)
def param_count(inputs: dict, out: dict) -> str:
    for i, c in enumerate(inputs["configs"]):
        want = reference_param_count(c["vocab_size"], c["d_model"], c["n_layers"], c["max_len"])
        untied, sizes = want + c["vocab_size"] * c["d_model"], out[f"model{i}"]
        compare(f"GPT({c}): the number of parameters of the model", sum(sizes), want,
                suspects={"vocab_size * d_model too many: tie lm_head.weight to the token embedding's weight": untied})
        largest = max(c["vocab_size"], c["max_len"], 4 * c["d_model"]) * c["d_model"]  # an embedding or W1
        if len(sizes) < 4 + 12 * c["n_layers"] or sizes[-1] > largest:
            raise AssertionError(f"GPT({c}) has {len(sizes)} parameter tensors, the largest of {sizes[-1]} elements: "
                                 f"the lab's GPT has at least {4 + 12 * c['n_layers']} (embeddings, LayerNorms, "
                                 f"weights and biases of every block), none larger than {largest}")
        compare(f"gpt_param_count for {c} (the model has {want} parameters)", out[f"formula{i}"], want)
    return "the model's parameter count equals the closed form"


def init_loss_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"config": {"vocab_size": 65, "d_model": 64, "n_heads": 4, "n_layers": 2, "max_len": 32}, "seed": seed,
            "idx": torch.randint(65, (8, 32), generator=g), "targets": torch.randint(65, (8, 32), generator=g)}


def init_loss_collect(inputs: dict, GPT) -> dict:
    torch.manual_seed(inputs["seed"])
    with torch.no_grad():
        return {"logits": GPT(**inputs["config"]).eval()(inputs["idx"])}


@define("01a.init_loss", init_loss_inputs, init_loss_collect)
def init_loss(inputs: dict, out: dict) -> str:
    V = inputs["config"]["vocab_size"]
    logits = as_tensor("GPT logits", out["logits"], (*inputs["idx"].shape, V))
    if logits.std(dim=-1).max() < 1e-3:
        raise AssertionError("the logits are the same for every token of the vocabulary: a model must compute them "
                             "from its weights (lm_head(ln_f(...))), not return a constant")
    loss = F.cross_entropy(logits.flatten(0, 1), inputs["targets"].flatten()).item()
    if abs(loss - math.log(V)) > 0.15:
        raise AssertionError(f"loss at initialisation is {loss:.3f}, but a model that knows nothing should score "
                             f"about ln({V}) = {math.log(V):.3f}: initialise the weights with a small std (0.02)")
    return f"the loss at initialisation is within 0.15 of ln({V})"


# ---------------------------------------------------------------- generation
def generate_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"config": dict(GPT_CONFIG), "seed": seed, "prompt": torch.randint(50, (2, 3), generator=g),
            "fixed": torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5]), "n_samples": 4000,
            "settings": [(1.0, None), (0.5, None), (1.0, 3)]}


def generate_collect(inputs: dict, GPT, generate) -> dict:
    torch.manual_seed(inputs["seed"])
    model = GPT(**inputs["config"]).eval()
    torch.manual_seed(inputs["seed"])
    with torch.no_grad():
        greedy = generate(model, inputs["prompt"], 8, top_k=1)
        start = torch.zeros(inputs["n_samples"], 1, dtype=torch.long)
        return {"greedy": greedy, "greedy_logits": model(greedy[:, :-1]),
                "long": attempt(generate, model, inputs["prompt"], 20, top_k=1),  # longer than max_len = 16
                "samples": [generate(FixedLogits(inputs["fixed"]), start, 1, temperature=t, top_k=k)[:, -1]
                            for t, k in inputs["settings"]]}


@define("01a.generate", generate_inputs, generate_collect)
def generate(inputs: dict, out: dict) -> str:
    prompt = inputs["prompt"]
    B, T0 = prompt.shape
    greedy = as_tensor(f"generate(model, idx of shape {(B, T0)}, 8)", out["greedy"], (B, T0 + 8)).long()
    if not torch.equal(greedy[:, :T0], prompt):
        raise AssertionError("generate must return the prompt followed by the new tokens; the prompt changed")
    want = out["greedy_logits"].argmax(-1)[:, T0 - 1:]
    for t in torch.nonzero((greedy[:, T0:] != want).any(0)).flatten().tolist()[:1]:
        raise AssertionError(f"with top_k=1, new token {t} is not the argmax of the logits at the previous position")
    as_tensor("generating 20 tokens from 3 with max_len = 16 (feed the model only the last max_len tokens)",
              out["long"], (B, T0 + 20))
    fixed, n = inputs["fixed"].double(), inputs["n_samples"]
    for (t, k), tokens in zip(inputs["settings"], out["samples"]):
        probs = torch.softmax(fixed / t, -1)
        if k is not None:
            probs = torch.where(probs >= probs.topk(k).values[-1], probs, 0.0)
            probs = probs / probs.sum()
        freq = torch.bincount(tokens.long().flatten(), minlength=len(fixed)).double()[:len(fixed)] / n
        z = ((freq - probs).abs() / (probs * (1 - probs) / n).sqrt().clamp_min(1e-12)).max().item()
        if z > 5 or (freq[probs == 0] > 0).any():
            raise AssertionError(
                f"sampling with temperature={t}, top_k={k}: token frequencies {[round(f, 3) for f in freq.tolist()]} "
                f"do not match softmax(logits / temperature) restricted to the top k, "
                f"{[round(p, 3) for p in probs.tolist()]}")
    return "greedy decoding, cropping to max_len, temperature and top-k sampling behave as specified"
