"""Checks of Lab 1a: attention and a decoder-only Transformer.

Each check compares the student's outputs with a PyTorch built-in
(``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``, ``nn.LayerNorm``)
or with a closed-form property (causality, a parameter count, ln V at initialisation).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.checks import Check, assert_close, linear_weights, load_weights, seeded_generator


def _mha_weights(prefix: str, d_model: int, g: torch.Generator) -> dict:
    weights = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        weights |= linear_weights(f"{prefix}{name}", d_model, d_model, g)
    return weights


def _reference_mha(weights: dict, prefix: str, d_model: int, n_heads: int) -> nn.MultiheadAttention:
    """``nn.MultiheadAttention`` carrying the student's layout of weights."""
    mha = nn.MultiheadAttention(d_model, n_heads, batch_first=True).double()
    w = {k: v.double() for k, v in weights.items()}
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([w[f"{prefix}{n}_proj.weight"] for n in "qkv"]))
        mha.in_proj_bias.copy_(torch.cat([w[f"{prefix}{n}_proj.bias"] for n in "qkv"]))
        mha.out_proj.weight.copy_(w[f"{prefix}out_proj.weight"])
        mha.out_proj.bias.copy_(w[f"{prefix}out_proj.bias"])
    return mha


def _causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


# ---------------------------------------------------------------- scaled dot-product attention
def sdpa_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    B, H, T_q, T_k, d = 2, 3, 5, 7, 8
    mask = torch.rand(B, H, T_q, T_k, generator=g) > 0.4
    mask[..., 0] = True  # every query may attend somewhere
    return {"q": torch.randn(B, H, T_q, d, generator=g), "k": torch.randn(B, H, T_k, d, generator=g),
            "v": torch.randn(B, H, T_k, d, generator=g), "mask": mask,
            "causal": _causal(T_q)[:, :T_q], "big": 3000.0}


def sdpa_collect(inputs: dict, scaled_dot_product_attention) -> dict:
    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["mask"]
    qs, ks, vs = q[..., :5, :], k[..., :5, :], v[..., :5, :]
    out = {}
    out["plain"], out["plain_w"] = scaled_dot_product_attention(q, k, v)
    out["masked"], out["masked_w"] = scaled_dot_product_attention(q, k, v, mask)
    out["bcast"], out["bcast_w"] = scaled_dot_product_attention(qs, ks, vs, inputs["causal"])
    out["3d"], _ = scaled_dot_product_attention(q[0], k[0], v[0])
    out["big"], _ = scaled_dot_product_attention(q * inputs["big"], k * inputs["big"], v)
    return out


def sdpa_verify(inputs: dict, out: dict) -> str:
    q, k, v = (inputs[n].double() for n in "qkv")
    mask = inputs["mask"]
    ref = F.scaled_dot_product_attention
    unscaled = ref(q, k, v, scale=1.0)
    if isinstance(out["plain"], torch.Tensor) and out["plain"].shape == unscaled.shape \
            and torch.allclose(out["plain"].double(), unscaled, atol=1e-5):
        raise AssertionError("sdpa without mask equals attention with NO 1/sqrt(d) scaling: "
                             "divide the scores q @ k^T by sqrt(d) before the softmax")
    rows = out["plain_w"].double().sum(-1)
    if not torch.allclose(rows, torch.ones_like(rows), atol=1e-5):
        raise AssertionError(f"attention weights: rows sum to {[round(r, 3) for r in rows.flatten()[:3].tolist()]}..., not 1: "
                             "take the softmax over the last axis (the keys), dim=-1")
    assert_close("sdpa without mask (vs F.scaled_dot_product_attention)", out["plain"], ref(q, k, v))
    assert_close("sdpa with a boolean mask (True = may attend)", out["masked"], ref(q, k, v, attn_mask=mask),
                 hint="True in the mask means 'may attend'; fill the scores where the mask is False with -inf")
    leaked = out["masked_w"].detach()[~mask].abs().max().item()
    if leaked > 1e-6:
        raise AssertionError(f"attention weights: weight {leaked:.3g} on a key the mask forbids")
    qs, ks, vs = q[..., :5, :], k[..., :5, :], v[..., :5, :]
    assert_close("sdpa with a (T_q, T_k) mask broadcast over batch and heads", out["bcast"],
                 ref(qs, ks, vs, attn_mask=inputs["causal"]))
    assert_close("sdpa on 3-D inputs (no head axis)", out["3d"], ref(q[0], k[0], v[0]))
    big = inputs["big"]
    assert_close(f"sdpa with logits around 1e4 (q and k scaled by {big:g})", out["big"],
                 ref(q * big, k * big, v), atol=1e-4,
                 hint="subtract the row maximum before exponentiating, or use torch.softmax, which does")
    return "✔ 01a.sdpa: matches F.scaled_dot_product_attention with and without masks; rows sum to 1; stable at large logits"


# ---------------------------------------------------------------- causal mask
def causal_inputs(seed: int) -> dict:
    return {"sizes": [1, 4, 9]}


def causal_collect(inputs: dict, causal_mask) -> dict:
    return {f"mask{T}": causal_mask(T) for T in inputs["sizes"]}


def causal_verify(inputs: dict, out: dict) -> str:
    g = seeded_generator(0)
    for T in inputs["sizes"]:
        mask = out[f"mask{T}"]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (T, T):
            got = f"{getattr(mask, 'dtype', type(mask).__name__)} of shape {tuple(getattr(mask, 'shape', ()))}"
            raise AssertionError(f"causal_mask({T}) must be a ({T}, {T}) bool tensor, got {got}")
        # Behaviour: change key/value j; an output at i < j must not move, and outputs at i >= j must.
        q, k, v = (torch.randn(1, 1, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
        base = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        moved = torch.zeros(T, T, dtype=torch.bool)  # moved[i, j]: output i changes when token j changes
        for j in range(T):
            k2, v2 = k.clone(), v.clone()
            k2[..., j, :] += 1.0
            v2[..., j, :] += 1.0
            moved[:, j] = (F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask) - base).abs().amax(-1)[0, 0] > 1e-9
        leaks = torch.nonzero(moved.triu(1))
        if len(leaks):
            i, j = leaks[0].tolist()
            raise AssertionError(f"causal_mask({T}) lets position {i} see position {j} (a future token)")
        hidden = torch.nonzero(~moved & torch.ones(T, T, dtype=torch.bool).tril())
        if len(hidden):
            i, j = hidden[0].tolist()
            raise AssertionError(f"causal_mask({T}) hides position {j} from position {i}: "
                                 "a token must see itself and every earlier token")
    return "✔ 01a.causal_mask: no position sees the future, and every position sees itself and its past"


# ---------------------------------------------------------------- multi-head attention
def mha_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model, n_heads = 16, 4
    return {"d_model": d_model, "n_heads": n_heads, "weights": _mha_weights("", d_model, g),
            "x": torch.randn(2, 5, d_model, generator=g), "context": torch.randn(2, 7, d_model, generator=g),
            "mask": _causal(5)}


def mha_collect(inputs: dict, MultiHeadAttention) -> dict:
    mha = MultiHeadAttention(inputs["d_model"], inputs["n_heads"])
    load_weights(mha, inputs["weights"], "MultiHeadAttention")
    x, context = inputs["x"], inputs["context"]
    with torch.no_grad():
        return {"self": mha(x), "masked": mha(x, mask=inputs["mask"]), "cross": mha(x, context=context)}


def mha_verify(inputs: dict, out: dict) -> str:
    ref = _reference_mha(inputs["weights"], "", inputs["d_model"], inputs["n_heads"])
    x, context = inputs["x"].double(), inputs["context"].double()
    with torch.no_grad():
        want_self = ref(x, x, x, need_weights=False)[0]
        want_masked = ref(x, x, x, attn_mask=~inputs["mask"], need_weights=False)[0]
        want_cross = ref(x, context, context, need_weights=False)[0]
    hint = "split d_model into heads with .view(B, T, H, d).transpose(1, 2), and merge them back the same way"
    assert_close("self-attention (vs nn.MultiheadAttention with the same weights)", out["self"], want_self, hint=hint)
    assert_close("masked self-attention (causal mask)", out["masked"], want_masked)
    assert_close("cross-attention (queries from x, keys and values from context)", out["cross"], want_cross,
                 hint="in cross-attention, k and v are projections of the context, q of x")
    return "✔ 01a.mha: matches nn.MultiheadAttention for self-, masked and cross-attention"


# ---------------------------------------------------------------- feed-forward and decoder block
def block_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model, n_heads, d_ff = 16, 4, 40
    ffn = linear_weights("fc1", d_model, d_ff, g) | linear_weights("fc2", d_ff, d_model, g)
    block = {}
    for ln in ("ln1", "ln2"):
        block[f"{ln}.weight"] = 1 + 0.1 * torch.randn(d_model, generator=g)
        block[f"{ln}.bias"] = 0.1 * torch.randn(d_model, generator=g)
    block |= _mha_weights("attn.", d_model, g)
    block |= linear_weights("ffn.fc1", d_model, d_ff, g) | linear_weights("ffn.fc2", d_ff, d_model, g)
    return {"d_model": d_model, "n_heads": n_heads, "d_ff": d_ff, "ffn": ffn, "block": block,
            "x": torch.randn(2, 6, d_model, generator=g)}


def block_collect(inputs: dict, FeedForward, DecoderBlock) -> dict:
    d_model, n_heads, d_ff = inputs["d_model"], inputs["n_heads"], inputs["d_ff"]
    ffn = FeedForward(d_model, d_ff)
    load_weights(ffn, inputs["ffn"], "FeedForward")
    block = DecoderBlock(d_model, n_heads, d_ff)
    load_weights(block, inputs["block"], "DecoderBlock")
    with torch.no_grad():
        return {"ffn": ffn(inputs["x"]), "block": block(inputs["x"])}


def _reference_ffn(w: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(F.linear(x, w[f"{prefix}fc1.weight"], w[f"{prefix}fc1.bias"]))
    return F.linear(h, w[f"{prefix}fc2.weight"], w[f"{prefix}fc2.bias"])


def block_verify(inputs: dict, out: dict) -> str:
    d_model, n_heads = inputs["d_model"], inputs["n_heads"]
    x = inputs["x"].double()
    ffn_w = {k: v.double() for k, v in inputs["ffn"].items()}
    assert_close("FeedForward (Linear -> GELU -> Linear)", out["ffn"], _reference_ffn(ffn_w, "", x),
                 hint="use the exact GELU (F.gelu / nn.GELU default), between fc1 and fc2")
    w = {k: v.double() for k, v in inputs["block"].items()}
    attn = _reference_mha(inputs["block"], "attn.", d_model, n_heads)
    ln = lambda name, t: F.layer_norm(t, (d_model,), w[f"{name}.weight"], w[f"{name}.bias"])
    with torch.no_grad():
        h = ln("ln1", x)
        x1 = x + attn(h, h, h, attn_mask=~_causal(x.shape[1]), need_weights=False)[0]
        want = x1 + _reference_ffn(w, "ffn.", ln("ln2", x1))
    assert_close("DecoderBlock (pre-norm: x + attn(ln1(x)) with a causal mask, then x + ffn(ln2(x)))",
                 out["block"], want,
                 hint="pre-norm normalises the input of each sublayer, not the residual sum; the block's "
                      "self-attention is causal")
    return "✔ 01a.block: FeedForward and the pre-norm DecoderBlock match a reference built from PyTorch modules"


# ---------------------------------------------------------------- GPT
GPT_CONFIG = {"vocab_size": 50, "d_model": 32, "n_heads": 4, "n_layers": 2, "max_len": 16}


def gpt_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    idx = torch.randint(GPT_CONFIG["vocab_size"], (3, 12), generator=g)
    return {"config": dict(GPT_CONFIG), "seed": seed, "idx": idx,
            "targets": torch.randint(GPT_CONFIG["vocab_size"], (3, 12), generator=g),
            "future": torch.randint(GPT_CONFIG["vocab_size"], (3, 12), generator=g)}


def _build_gpt(GPT, inputs: dict):
    torch.manual_seed(inputs["seed"])
    return GPT(**inputs["config"])


def gpt_collect(inputs: dict, GPT) -> dict:
    model = _build_gpt(GPT, inputs)
    idx, future = inputs["idx"], inputs["future"]
    with torch.no_grad():
        logits = model(idx)
        # Replace the tokens after position t by other tokens, for each t.
        changed = [model(torch.cat([idx[:, :t + 1], future[:, t + 1:]], dim=1)) for t in range(idx.shape[1])]
        short = model(idx[:, :1])
    return {"logits": logits, "changed": torch.stack(changed), "short": short}


def gpt_verify(inputs: dict, out: dict) -> str:
    B, T = inputs["idx"].shape
    V = inputs["config"]["vocab_size"]
    for name, shape in (("logits", (B, T, V)), ("short", (B, 1, V))):
        got = tuple(getattr(out[name], "shape", ()))
        if got != shape:
            raise AssertionError(f"GPT(idx) for idx of shape {(B, shape[1])}: logits of shape {got}, expected {shape} "
                                 "(batch, time, vocab_size)")
    for t in range(T - 1):
        diff = (out["changed"][t][:, :t + 1] - out["logits"][:, :t + 1]).abs().amax(dim=(0, 2))
        if diff.max() > 1e-5:
            i = int(torch.nonzero(diff > 1e-5)[0])
            raise AssertionError(f"GPT is not causal: the logits at position {i} change when the tokens after "
                                 f"position {t} change (by up to {diff.max().item():.3g})")
    return "✔ 01a.gpt: logits have shape (B, T, vocab_size), and no position's logits depend on later tokens"


def reference_param_count(vocab_size: int, d_model: int, n_layers: int, max_len: int) -> int:
    """Closed form for the lab's GPT: tied embeddings, biases everywhere, d_ff = 4 d_model."""
    per_block = 12 * d_model ** 2 + 13 * d_model
    return vocab_size * d_model + max_len * d_model + n_layers * per_block + 2 * d_model


def param_count_inputs(seed: int) -> dict:
    configs = [dict(GPT_CONFIG), {"vocab_size": 65, "d_model": 48, "n_heads": 6, "n_layers": 3, "max_len": 128}]
    return {"configs": configs}


def param_count_collect(inputs: dict, GPT, gpt_param_count) -> dict:
    out = {}
    for i, config in enumerate(inputs["configs"]):
        model = GPT(**config)
        out[f"model{i}"] = sum(p.numel() for p in model.parameters())
        out[f"formula{i}"] = gpt_param_count(config["vocab_size"], config["d_model"], config["n_layers"],
                                             config["max_len"])
    return out


def param_count_verify(inputs: dict, out: dict) -> str:
    for i, c in enumerate(inputs["configs"]):
        want = reference_param_count(c["vocab_size"], c["d_model"], c["n_layers"], c["max_len"])
        model, formula = int(out[f"model{i}"]), int(out[f"formula{i}"])
        extra = model - want
        if extra == c["vocab_size"] * c["d_model"]:
            raise AssertionError(f"GPT({c}): {model} parameters, {extra} = vocab_size * d_model too many: "
                                 "tie lm_head.weight to the token embedding's weight")
        if model != want:
            raise AssertionError(f"GPT({c}) has {model} parameters; the lab's architecture has {want} "
                                 f"(difference {extra:+d})")
        if formula != want:
            raise AssertionError(f"gpt_param_count for {c} gives {formula}, but the model has {want} parameters")
    return "✔ 01a.param_count: the model's parameter count equals the closed form"


def init_loss_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    config = {"vocab_size": 65, "d_model": 64, "n_heads": 4, "n_layers": 2, "max_len": 32}
    return {"config": config, "seed": seed, "idx": torch.randint(65, (8, 32), generator=g),
            "targets": torch.randint(65, (8, 32), generator=g)}


def init_loss_collect(inputs: dict, GPT) -> dict:
    model = _build_gpt(GPT, inputs)
    with torch.no_grad():
        logits = model(inputs["idx"])
    return {"logits": logits}


def init_loss_verify(inputs: dict, out: dict) -> str:
    V = inputs["config"]["vocab_size"]
    logits = out["logits"]
    if tuple(getattr(logits, "shape", ())) != (*inputs["idx"].shape, V):
        raise AssertionError(f"GPT logits of shape {tuple(getattr(logits, 'shape', ()))}, expected {(*inputs['idx'].shape, V)}")
    loss = F.cross_entropy(logits.double().flatten(0, 1), inputs["targets"].flatten()).item()
    if abs(loss - math.log(V)) > 0.15:
        raise AssertionError(f"loss at initialisation is {loss:.3f}, but a model that knows nothing should score "
                             f"about ln({V}) = {math.log(V):.3f}: initialise the weights with a small std (0.02)")
    return f"✔ 01a.init_loss: the loss at initialisation is within 0.15 of ln({V})"


# ---------------------------------------------------------------- generation
class FixedLogits(nn.Module):
    """A stand-in model whose next-token logits are always the same; lets a check test sampling exactly."""

    def __init__(self, logits: torch.Tensor, max_len: int = 8):
        super().__init__()
        self.register_buffer("logits", logits)
        self.max_len = max_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert idx.shape[1] <= self.max_len, f"the model got {idx.shape[1]} tokens, more than max_len={self.max_len}"
        return self.logits.expand(*idx.shape, -1)


def generate_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"config": dict(GPT_CONFIG), "seed": seed, "prompt": torch.randint(50, (2, 3), generator=g),
            "fixed": torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5]), "n_samples": 4000}


def generate_collect(inputs: dict, GPT, generate) -> dict:
    model = _build_gpt(GPT, inputs)
    model.eval()
    torch.manual_seed(inputs["seed"])
    with torch.no_grad():
        greedy = generate(model, inputs["prompt"], 8, top_k=1)
        greedy_logits = model(greedy[:, :-1])
        try:  # longer than max_len = 16
            long = generate(model, inputs["prompt"], 20, top_k=1)
        except Exception as error:  # reported by verify, with a hint
            long = f"{type(error).__name__}: {error}"
        stub = FixedLogits(inputs["fixed"])
        start = torch.zeros(inputs["n_samples"], 1, dtype=torch.long)
        samples = {f"T{t}_k{k}": generate(stub, start, 1, temperature=t, top_k=k)[:, -1]
                   for t, k in ((1.0, None), (0.5, None), (1.0, 3))}
    return {"greedy": greedy, "greedy_logits": greedy_logits, "long": long, **samples}


def generate_verify(inputs: dict, out: dict) -> str:
    prompt = inputs["prompt"]
    B, T0 = prompt.shape
    greedy = out["greedy"]
    if tuple(getattr(greedy, "shape", ())) != (B, T0 + 8):
        raise AssertionError(f"generate(model, idx of shape {(B, T0)}, 8) returned shape "
                             f"{tuple(getattr(greedy, 'shape', ()))}, expected {(B, T0 + 8)}")
    if not torch.equal(greedy[:, :T0], prompt):
        raise AssertionError("generate must return the prompt followed by the new tokens; the prompt changed")
    want = out["greedy_logits"].argmax(-1)[:, T0 - 1:]
    if not torch.equal(greedy[:, T0:], want):
        t = int(torch.nonzero((greedy[:, T0:] != want).any(0))[0])
        raise AssertionError(f"with top_k=1, new token {t} is not the argmax of the logits at the previous position")
    if isinstance(out["long"], str) or tuple(out["long"].shape) != (B, T0 + 20):
        problem = f"raised {out['long']}" if isinstance(out["long"], str) else f"gave shape {tuple(out['long'].shape)}"
        raise AssertionError(f"generating 20 tokens from 3 with max_len = 16 {problem}: "
                             "feed the model only the last max_len tokens")
    fixed, n = inputs["fixed"].double(), inputs["n_samples"]
    for (t, k), name in (((1.0, None), "T1.0_kNone"), ((0.5, None), "T0.5_kNone"), ((1.0, 3), "T1.0_k3")):
        tokens = out[name]
        probs = torch.softmax(fixed / t, -1)
        if k is not None:
            kept = torch.zeros_like(probs, dtype=torch.bool)
            kept[probs.topk(k).indices] = True
            probs = torch.where(kept, probs, 0.0)
            probs = probs / probs.sum()
        freq = torch.bincount(tokens.long().flatten(), minlength=len(fixed)).double()[:len(fixed)] / n
        sigma = (probs * (1 - probs) / n).sqrt()
        z = ((freq - probs).abs() / sigma.clamp_min(1e-12)).max().item()
        if z > 5 or (freq[probs == 0] > 0).any():
            raise AssertionError(
                f"sampling with temperature={t}, top_k={k}: token frequencies {[round(f, 3) for f in freq.tolist()]} "
                f"do not match softmax(logits / temperature) restricted to the top k, "
                f"{[round(p, 3) for p in probs.tolist()]}")
    return "✔ 01a.generate: greedy decoding, cropping to max_len, temperature and top-k sampling behave as specified"


CHECKS = [
    Check("01a.sdpa", sdpa_inputs, sdpa_collect, sdpa_verify),
    Check("01a.causal_mask", causal_inputs, causal_collect, causal_verify),
    Check("01a.mha", mha_inputs, mha_collect, mha_verify),
    Check("01a.block", block_inputs, block_collect, block_verify),
    Check("01a.gpt", gpt_inputs, gpt_collect, gpt_verify),
    Check("01a.param_count", param_count_inputs, param_count_collect, param_count_verify),
    Check("01a.init_loss", init_loss_inputs, init_loss_collect, init_loss_verify),
    Check("01a.generate", generate_inputs, generate_collect, generate_verify),
]
