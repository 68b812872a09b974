"""Checks of Lab 2: attention variants, the KV cache and FlashAttention.

Each check compares the student's outputs with an independent reference: PyTorch built-ins
(``torch.repeat_interleave``, ``F.scaled_dot_product_attention`` with ``enable_gqa``,
``F.rms_norm``), a closed-form property (greedy tokens are the argmax of a full forward pass;
what a cache holds per token), or figures computed by hand from published configurations.
The hidden checks (``hidden_checks/lab02.py``) add Hugging Face's Llama and DeepSeek-V3
attention modules as references.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from labkit.checks import Check, assert_close, load_weights, seeded_generator


def _linear(prefix: str, d_in: int, d_out: int, g: torch.Generator, bias: bool = False) -> dict:
    weights = {f"{prefix}.weight": torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)}
    if bias:
        weights[f"{prefix}.bias"] = 0.1 * torch.randn(d_out, generator=g)
    return weights


def _causal(T_q: int, T_k: int | None = None) -> torch.Tensor:
    return torch.ones(T_q, T_k or T_q, dtype=torch.bool).tril()


def _call(fn, *args, **kwargs):
    """fn(*args, **kwargs), or the error it raised as a string (verify turns it into a clear message)."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # reported by verify, with the case that raised it
        return f"{type(error).__name__}: {error}"


def _raised(what: str, got) -> None:
    if isinstance(got, str):
        raise AssertionError(f"{what} raised {got}")


class ConcatCache:
    """The simplest cache that honours the lab's protocol: ``update(a, b)`` appends along the
    time axis (dim -2) and returns everything so far. The checks use it so that a check of an
    attention module does not depend on the student's own cache; it also records what it holds."""

    def __init__(self):
        self.a = self.b = None

    def update(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.a = a if self.a is None else torch.cat([self.a, a], dim=-2)
        self.b = b if self.b is None else torch.cat([self.b, b], dim=-2)
        return self.a, self.b


# ---------------------------------------------------------------- repeat_kv
def repeat_kv_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"x": torch.randn(2, 3, 5, 4, generator=g), "n_reps": [1, 2, 4]}


def repeat_kv_collect(inputs: dict, repeat_kv) -> dict:
    return {f"rep{n}": _call(repeat_kv, inputs["x"], n) for n in inputs["n_reps"]}


def repeat_kv_verify(inputs: dict, out: dict) -> str:
    x = inputs["x"]
    for n in inputs["n_reps"]:
        got = out[f"rep{n}"]
        _raised(f"repeat_kv(x of shape {tuple(x.shape)}, n_rep={n})", got)
        want = torch.repeat_interleave(x, n, dim=1)  # Llama's grouping (HF documents repeat_kv as this)
        if isinstance(got, torch.Tensor) and got.shape == want.shape and n > 1 \
                and torch.equal(got, x.repeat(1, n, 1, 1)):
            raise AssertionError(
                f"repeat_kv(x, n_rep={n}) tiles the KV heads (0, 1, 2, 0, 1, 2, ...), like x.repeat: query head h must "
                f"read KV head h // n_rep, so each KV head is repeated n_rep times in place (0, 0, 1, 1, ...), "
                f"as torch.repeat_interleave(x, n_rep, dim=1) or Llama's expand + reshape do")
        assert_close(f"repeat_kv(x of shape {tuple(x.shape)}, n_rep={n}) (vs torch.repeat_interleave on dim 1)",
                     got, want, atol=0, hint="output head h must equal input head h // n_rep")
    return "✔ 02.repeat_kv: KV head j serves query heads j·n_rep … j·n_rep + n_rep − 1, as in Llama"


# ---------------------------------------------------------------- grouped-query attention
GQA_CASES = {"MHA": (4, 4, False), "GQA": (8, 2, True), "MQA": (8, 1, False)}  # name: (n_heads, n_kv_heads, bias)


def _gqa_weights(d_model: int, n_heads: int, n_kv_heads: int, bias: bool, g: torch.Generator) -> dict:
    d_head = d_model // n_heads
    return (_linear("q_proj", d_model, n_heads * d_head, g, bias) | _linear("k_proj", d_model, n_kv_heads * d_head, g, bias)
            | _linear("v_proj", d_model, n_kv_heads * d_head, g, bias) | _linear("o_proj", n_heads * d_head, d_model, g, bias))


def gqa_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model = 32
    return {"d_model": d_model, "cases": dict(GQA_CASES),
            "weights": {name: _gqa_weights(d_model, h, kv, b, g) for name, (h, kv, b) in GQA_CASES.items()},
            "x": torch.randn(2, 6, d_model, generator=g)}


def gqa_collect(inputs: dict, GroupedQueryAttention) -> dict:
    x, out = inputs["x"], {}
    T = x.shape[1]
    for name, (n_heads, n_kv_heads, bias) in inputs["cases"].items():
        attn = GroupedQueryAttention(inputs["d_model"], n_heads, n_kv_heads, bias=bias)
        load_weights(attn, inputs["weights"][name], f"GroupedQueryAttention({inputs['d_model']}, {n_heads}, {n_kv_heads}, bias={bias})")
        with torch.no_grad():
            out[f"{name}.plain"] = _call(attn, x)
            out[f"{name}.causal"] = _call(attn, x, mask=_causal(T))
            cache = ConcatCache()  # prefill 4 tokens, then decode 2, one at a time
            steps = [_call(attn, x[:, :4], mask=_causal(4), cache=cache)]
            steps += [_call(attn, x[:, t:t + 1], cache=cache) for t in (4, 5)]
            bad = next((s for s in steps if isinstance(s, str)), None)
            out[f"{name}.cached"] = bad or torch.cat(steps, dim=1)
    return out


def _reference_gqa(w: dict, x: torch.Tensor, n_heads: int, n_kv_heads: int, mask=None, interleave=True):
    """GQA from F.linear and F.scaled_dot_product_attention(enable_gqa=True), in float64."""
    w = {k: v.double() for k, v in w.items()}
    x = x.double()
    B, T, _ = x.shape
    proj = lambda n, t: F.linear(t, w[f"{n}.weight"], w.get(f"{n}.bias"))
    q = proj("q_proj", x).view(B, T, n_heads, -1).transpose(1, 2)
    k = proj("k_proj", x).view(B, T, n_kv_heads, -1).transpose(1, 2)
    v = proj("v_proj", x).view(B, T, n_kv_heads, -1).transpose(1, 2)
    if interleave:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    else:  # the classic bug, for the hint: KV heads tiled instead of interleaved
        n_rep = n_heads // n_kv_heads
        out = F.scaled_dot_product_attention(q, k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1), attn_mask=mask)
    return proj("o_proj", out.transpose(1, 2).reshape(B, T, -1))


def gqa_verify(inputs: dict, out: dict) -> str:
    x = inputs["x"]
    T = x.shape[1]
    for name, (n_heads, n_kv_heads, bias) in inputs["cases"].items():
        w = inputs["weights"][name]
        what = f"{name}: GroupedQueryAttention(d_model={inputs['d_model']}, n_heads={n_heads}, n_kv_heads={n_kv_heads}, bias={bias})"
        for case, mask in (("plain", None), ("causal", _causal(T))):
            got = out[f"{name}.{case}"]
            _raised(f"{what}, {case}", got)
            want = _reference_gqa(w, x, n_heads, n_kv_heads, mask)
            if n_kv_heads not in (1, n_heads) and isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(
                    got.double(), _reference_gqa(w, x, n_heads, n_kv_heads, mask, interleave=False), atol=1e-5):
                raise AssertionError(f"{what}: query head h reads KV head h % n_kv_heads (heads tiled); it must read "
                                     "KV head h // n_rep, as in Llama (repeat_interleave)")
            assert_close(f"{what}, {'causal mask' if mask is not None else 'no mask'} "
                         "(vs F.scaled_dot_product_attention with enable_gqa=True)", got, want,
                         hint="scale the scores by 1/sqrt(d_head), d_head = d_model // n_heads; split q into n_heads "
                              "and k, v into n_kv_heads heads, and repeat k, v with repeat_kv")
        got = out[f"{name}.cached"]
        _raised(f"{what}, with a cache", got)
        assert_close(f"{what}, with a cache: prefill 4 tokens (causal mask), then 2 tokens one at a time; "
                     "outputs must equal those of the full causal pass", got, _reference_gqa(w, x, n_heads, n_kv_heads, _causal(T)),
                     hint="with a cache, call k, v = cache.update(k, v) before attending, so the new queries see "
                          "every cached key")
    return "✔ 02.gqa: MHA, GQA and MQA match F.scaled_dot_product_attention(enable_gqa=True), with and without a cache"


# ---------------------------------------------------------------- KV cache
def kv_cache_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    B, H, d, max_len = 2, 3, 4, 12
    chunks = [5, 1, 1, 3]
    return {"B": B, "H": H, "d": d, "max_len": max_len, "chunks": chunks,
            "k": torch.randn(B, H, sum(chunks), d, generator=g), "v": torch.randn(B, H, sum(chunks), d, generator=g)}


def kv_cache_collect(inputs: dict, KVCache) -> dict:
    B, H, d, max_len = inputs["B"], inputs["H"], inputs["d"], inputs["max_len"]
    k, v = inputs["k"], inputs["v"]
    cache = KVCache(B, max_len, H, d)
    out = {"nbytes_empty": int(cache.nbytes)}
    start = 0
    for i, T in enumerate(inputs["chunks"]):
        got = _call(cache.update, k[:, :, start:start + T], v[:, :, start:start + T])
        out[f"step{i}"] = got if isinstance(got, str) else {"k": got[0].clone(), "v": got[1].clone(),
                                                             "storage": got[0].untyped_storage().data_ptr()}
        start += T
    out["nbytes_full"] = int(cache.nbytes)
    cache.reset()
    got = _call(cache.update, v[:, :, :2], k[:, :, :2])  # after reset, the cache starts again from empty
    out["after_reset"] = got if isinstance(got, str) else {"k": got[0].clone(), "v": got[1].clone()}
    out["nbytes_float64"] = int(KVCache(B, max_len, H, d, dtype=torch.float64).nbytes)
    return out


def kv_cache_verify(inputs: dict, out: dict) -> str:
    B, H, d, max_len = inputs["B"], inputs["H"], inputs["d"], inputs["max_len"]
    k, v = inputs["k"], inputs["v"]
    end = 0
    for i, T in enumerate(inputs["chunks"]):
        end += T
        got = out[f"step{i}"]
        what = f"KVCache.update, call {i + 1} (chunks of {inputs['chunks']} tokens; {end} tokens so far)"
        _raised(what, got)
        for name, full in (("k", k), ("v", v)):
            want = full[:, :, :end]
            g = got[name]
            if isinstance(g, torch.Tensor) and g.shape[2:3] == (end - 1,) and torch.equal(g, full[:, :, 1:end]):
                raise AssertionError(f"{what}: the returned {name} lacks the first token: return positions "
                                     f"0 … {end - 1} of the buffer, not 1 … {end - 1}")
            assert_close(f"{what}: returned {name} (vs torch.cat of every {name} given so far)", g, want, atol=0,
                         hint="write the new tokens at positions [length, length + T) and return [:length + T]")
    storages = {out[f"step{i}"]["storage"] for i in range(len(inputs["chunks"]))}
    if len(storages) > 1:
        raise AssertionError("KVCache.update returned the keys in a new tensor at different calls: write the new "
                             "tokens into the preallocated buffer and return a view of it (slicing), since growing "
                             "the cache with torch.cat copies all of it at every step")
    got = out["after_reset"]
    _raised("KVCache.update after reset()", got)
    if isinstance(got["k"], torch.Tensor) and got["k"].ndim == 4 and got["k"].shape[2] != 2:
        raise AssertionError(f"KVCache.update after reset() and 2 new tokens returned {got['k'].shape[2]} tokens, "
                             "expected 2: reset() must set the number of cached tokens back to 0")
    assert_close("KVCache.update after reset(): the returned k must hold only the tokens given since the reset",
                 got["k"], v[:, :, :2], atol=0, hint="reset() must set the number of cached tokens back to 0")
    want = 2 * B * H * max_len * d * 4
    for name in ("nbytes_empty", "nbytes_full"):
        if out[name] != want:
            raise AssertionError(f"KVCache({B}, max_len={max_len}, {H}, {d}).nbytes is {out[name]} "
                                 f"({'empty' if name == 'nbytes_empty' else 'full'}), expected {want} = 2 (K and V) × "
                                 f"{B} × {H} × {max_len} × {d} × 4 bytes: the preallocated buffers, whatever is filled")
    if out["nbytes_float64"] != 2 * want:
        raise AssertionError(f"KVCache(..., dtype=torch.float64).nbytes is {out['nbytes_float64']}, expected {2 * want}: "
                             "allocate the buffers with the given dtype")
    return "✔ 02.kv_cache: update appends and returns every cached token, reset empties it, nbytes counts both buffers"


# ---------------------------------------------------------------- generation with a cache
DECODER_CONFIG = {"vocab_size": 40, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "max_len": 24}


def generate_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"config": dict(DECODER_CONFIG), "seed": seed, "new": 12,
            "prompt": torch.randint(DECODER_CONFIG["vocab_size"], (2, 5), generator=g)}


def generate_collect(inputs: dict, Decoder, generate) -> dict:
    torch.manual_seed(inputs["seed"])
    model = Decoder(**inputs["config"]).double().eval()
    with torch.no_grad():  # larger weights than at initialisation, so that every bug changes some argmax
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    calls = []
    forward = model.forward

    def recording_forward(idx, caches=None):
        calls.append((idx.shape[1], caches is not None))
        return forward(idx, caches)

    model.forward = recording_forward
    prompt, new = inputs["prompt"], inputs["new"]
    with torch.no_grad():
        cached = _call(generate, model, prompt, new, use_cache=True)
        cached_calls = list(calls)
        plain = _call(generate, model, prompt, new, use_cache=False)
        # The logits of one full forward pass over each output: the reference for greedy decoding.
        full = {name: forward(out[:, :-1]) for name, out in (("cached", cached), ("plain", plain))
                if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] > 1}
    return {"cached": cached, "plain": plain, "full_logits": full, "calls": cached_calls}


def generate_verify(inputs: dict, out: dict) -> str:
    prompt, new = inputs["prompt"], inputs["new"]
    B, T0 = prompt.shape
    for name in ("plain", "cached"):
        got = out[name]
        what = f"generate(model, prompt of shape {(B, T0)}, {new}, use_cache={name == 'cached'})"
        if isinstance(got, str):
            raise AssertionError(f"{what} raised {got}" + (
                ". With caches, the model's causal mask has (cached + new) columns: each cache's update must return "
                "every cached token, the new ones included" if name == "cached" else ""))
        if tuple(got.shape) != (B, T0 + new):
            raise AssertionError(f"{what} returned shape {tuple(got.shape)}, expected {(B, T0 + new)}")
        if not torch.equal(got[:, :T0], prompt):
            raise AssertionError(f"{what}: the output must start with the prompt")
    for name in ("plain", "cached"):
        want = torch.cat([prompt, out["full_logits"][name].argmax(-1)[:, T0 - 1:]], dim=1)  # greedy, from a full pass
        wrong = (out[name] != want).any(0)
        if wrong.any():
            t = int(torch.nonzero(wrong)[0])
            raise AssertionError(
                f"generate(..., use_cache={name == 'cached'}): token {t - T0} of the continuation is not the argmax of "
                f"the logits that a full forward pass over the tokens before it gives (greedy decoding)"
                + (": with a cache, every step must see all earlier tokens (prompt included) through the cache"
                   if name == "cached" else ""))
    calls = out["calls"]
    if not calls or not calls[0][1] or any(not c for _, c in calls):
        raise AssertionError("generate(..., use_cache=True) must pass the caches to the model on every call "
                             "(model(idx, caches) with caches = model.make_caches(batch_size))")
    if calls[0][0] != T0 or any(T != 1 for T, _ in calls[1:]) or len(calls) < new:
        raise AssertionError(f"generate(..., use_cache=True) fed the model {[T for T, _ in calls]} tokens per call: "
                             f"with a cache, feed the prompt once ({T0} tokens), then only the newest token (1) per step")
    return "✔ 02.generate: cached greedy decoding gives exactly the tokens of full recomputation, one token per step"


# ---------------------------------------------------------------- multi-head latent attention
MLA_CONFIG = {"d_model": 32, "n_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 16,
              "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}


def _mla_weights(c: dict, g: torch.Generator) -> dict:
    H, n, r, v = c["n_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    w = _linear("q_a_proj", c["d_model"], c["q_lora_rank"], g)
    w["q_a_layernorm.weight"] = 1 + 0.2 * torch.randn(c["q_lora_rank"], generator=g)
    w |= _linear("q_b_proj", c["q_lora_rank"], H * (n + r), g)
    w |= _linear("kv_a_proj_with_mqa", c["d_model"], c["kv_lora_rank"] + r, g)
    w["kv_a_layernorm.weight"] = 1 + 0.2 * torch.randn(c["kv_lora_rank"], generator=g)
    w |= _linear("kv_b_proj", c["kv_lora_rank"], H * (n + v), g)
    w |= _linear("o_proj", H * v, c["d_model"], g)
    return w


def mla_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"config": dict(MLA_CONFIG), "weights": _mla_weights(MLA_CONFIG, g),
            "x": torch.randn(2, 7, MLA_CONFIG["d_model"], generator=g)}


def _build_mla(MultiHeadLatentAttention, inputs: dict):
    mla = MultiHeadLatentAttention(**inputs["config"])
    load_weights(mla, inputs["weights"], "MultiHeadLatentAttention")
    return mla


def mla_collect(inputs: dict, MultiHeadLatentAttention) -> dict:
    mla = _build_mla(MultiHeadLatentAttention, inputs)
    x, T = inputs["x"], inputs["x"].shape[1]
    with torch.no_grad():
        return {f"{path}.{case}": _call(mla, x, mask=mask, absorb=path == "absorbed")
                for path in ("naive", "absorbed") for case, mask in (("plain", None), ("causal", _causal(T)))}


def _reference_mla(inputs: dict, mask=None) -> torch.Tensor:
    """MLA with the keys and values decompressed explicitly, from F.linear, F.rms_norm and
    F.scaled_dot_product_attention, in float64 (the decoupled RoPE is the identity in this lab)."""
    c = inputs["config"]
    w = {k: t.double() for k, t in inputs["weights"].items()}
    x = inputs["x"].double()
    B, T, _ = x.shape
    H, n, r, dv, rank = c["n_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    q = F.linear(F.rms_norm(F.linear(x, w["q_a_proj.weight"]), (c["q_lora_rank"],), w["q_a_layernorm.weight"], 1e-6),
                 w["q_b_proj.weight"]).view(B, T, H, n + r).transpose(1, 2)
    c_kv, k_pe = F.linear(x, w["kv_a_proj_with_mqa.weight"]).split([rank, r], dim=-1)
    c_kv = F.rms_norm(c_kv, (rank,), w["kv_a_layernorm.weight"], 1e-6)
    kv = F.linear(c_kv, w["kv_b_proj.weight"]).view(B, T, H, n + dv).transpose(1, 2)
    k = torch.cat([kv[..., :n], k_pe.unsqueeze(1).expand(B, H, T, r)], dim=-1)  # the rope key is shared by all heads
    out = F.scaled_dot_product_attention(q, k, kv[..., n:], attn_mask=mask, scale=1 / math.sqrt(n + r))
    return F.linear(out.transpose(1, 2).reshape(B, T, H * dv), w["o_proj.weight"])


def mla_verify(inputs: dict, out: dict) -> str:
    T = inputs["x"].shape[1]
    hints = {"naive": "q = q_b_proj(q_a_layernorm(q_a_proj(x))); [c_kv, k_pe] = kv_a_proj_with_mqa(x), normalise c_kv "
                      "with kv_a_layernorm, decompress it with kv_b_proj; the scale is 1/sqrt(qk_nope_head_dim + "
                      "qk_rope_head_dim); the rope key is shared by all heads",
             "absorbed": "kv_b_proj.weight has shape (out, in) = (n_heads·(qk_nope_head_dim + v_head_dim), "
                         "kv_lora_rank): view it as (n_heads, qk_nope_head_dim + v_head_dim, kv_lora_rank) and split "
                         "W_UK, W_UV along dim 1; q_nope @ W_UK gives the query in latent space, and the averaged "
                         "latent @ W_UV^T the head's output; the scale stays 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)"}
    for path in ("naive", "absorbed"):
        for case, mask in (("plain", None), ("causal", _causal(T))):
            got = out[f"{path}.{case}"]
            what = f"MultiHeadLatentAttention, {path} path (absorb={path == 'absorbed'}), {'causal mask' if mask is not None else 'no mask'}"
            _raised(what, got)
            if path == "absorbed" and isinstance(out[f"naive.{case}"], torch.Tensor):
                assert_close(f"{what}: absorbed path vs your naive path", got, out[f"naive.{case}"], hint=hints[path])
            assert_close(f"{what} (vs explicit decompression + F.scaled_dot_product_attention)", got,
                         _reference_mla(inputs, mask), hint=hints[path])
    return "✔ 02.mla: the naive and absorbed paths agree, and match explicit decompression with F.scaled_dot_product_attention"


def mla_cache_inputs(seed: int) -> dict:
    return mla_inputs(seed) | {"prefill": 4}


def mla_cache_collect(inputs: dict, MultiHeadLatentAttention) -> dict:
    mla = _build_mla(MultiHeadLatentAttention, inputs)
    x, P = inputs["x"], inputs["prefill"]
    out = {}
    with torch.no_grad():
        for path in ("naive", "absorbed"):
            cache = ConcatCache()
            steps = [_call(mla, x[:, :P], mask=_causal(P), cache=cache, absorb=path == "absorbed")]
            steps += [_call(mla, x[:, t:t + 1], cache=cache, absorb=path == "absorbed") for t in range(P, x.shape[1])]
            bad = next((s for s in steps if isinstance(s, str)), None)
            out[path] = bad or torch.cat(steps, dim=1)
            out[f"{path}.cached_numbers"] = sum(t.numel() for t in (cache.a, cache.b) if isinstance(t, torch.Tensor))
    return out


def mla_cache_verify(inputs: dict, out: dict) -> str:
    c = inputs["config"]
    B, T = inputs["x"].shape[:2]
    per_token = c["kv_lora_rank"] + c["qk_rope_head_dim"]
    want = _reference_mla(inputs, _causal(T))
    for path in ("naive", "absorbed"):
        what = f"MultiHeadLatentAttention with a cache, {path} path"
        _raised(what, out[path])
        held = out[f"{path}.cached_numbers"] / (B * T)
        if held != per_token:
            raise AssertionError(
                f"{what}: the cache holds {held:g} numbers per token, expected kv_lora_rank + qk_rope_head_dim = "
                f"{c['kv_lora_rank']} + {c['qk_rope_head_dim']} = {per_token}: call cache.update(c_kv, k_pe) with the "
                "compressed latent (B, T, kv_lora_rank) and the shared rope key (B, T, qk_rope_head_dim), before "
                "decompressing anything")
        assert_close(f"{what}: prefill {inputs['prefill']} tokens, then one at a time (vs the full causal pass)",
                     out[path], want, hint="attend over everything cache.update returns")
    return ("✔ 02.mla_cache: cached decoding matches the full pass, and the cache holds kv_lora_rank + "
            "qk_rope_head_dim numbers per token")


# ---------------------------------------------------------------- KV-cache size
# Published configurations: Llama 3 (Dubey et al., 2024), Mistral 7B (Jiang et al., 2023),
# DeepSeek-V2 (DeepSeek-AI, 2024: d_c = 512, d_h^R = 64, 60 layers) and DeepSeek-V3 (61 layers).
KV_BYTES_CASES = [
    # (what, arguments of kv_cache_bytes, bytes computed by hand)
    ("Llama 3 70B, 8192 tokens, bf16", (80, 8, 128, 8192), {}, 2 * 80 * 8 * 128 * 8192 * 2),  # 2.5 GiB
    ("Llama 3 70B as if it had MHA (64 KV heads), 8192 tokens, bf16", (80, 64, 128, 8192), {}, 21_474_836_480),
    ("Llama 3 8B, 131072 tokens, bf16", (32, 8, 128, 131072), {}, 17_179_869_184),  # 16 GiB
    ("Mistral 7B, 4096 tokens, batch 4, fp32", (32, 8, 128, 4096), {"batch": 4, "bytes_per_elem": 4}, 4 * 2**30),
]
MLA_BYTES_CASES = [
    ("DeepSeek-V2, 131072 tokens, bf16", (60, 512, 64, 131072), {}, 60 * 576 * 131072 * 2),  # 8.4375 GiB
    ("DeepSeek-V3, 8192 tokens, batch 2, fp8", (61, 512, 64, 8192), {"batch": 2, "bytes_per_elem": 1}, 575_668_224),
]


def kv_bytes_inputs(seed: int) -> dict:
    return {"kv": [(args, kwargs) for _, args, kwargs, _ in KV_BYTES_CASES],
            "mla": [(args, kwargs) for _, args, kwargs, _ in MLA_BYTES_CASES]}


def kv_bytes_collect(inputs: dict, kv_cache_bytes, mla_cache_bytes) -> dict:
    return {"kv": [_call(kv_cache_bytes, *a, **k) for a, k in inputs["kv"]],
            "mla": [_call(mla_cache_bytes, *a, **k) for a, k in inputs["mla"]]}


def kv_bytes_verify(inputs: dict, out: dict) -> str:
    for fn, cases, got_all in (("kv_cache_bytes", KV_BYTES_CASES, out["kv"]), ("mla_cache_bytes", MLA_BYTES_CASES, out["mla"])):
        for (what, args, kwargs, want), got in zip(cases, got_all):
            call = f"{fn}{args}" + (f" with {kwargs}" if kwargs else "")
            _raised(f"{call} ({what})", got)
            if got != want:
                hint = ""
                if fn == "kv_cache_bytes" and got * 2 == want:
                    hint = ": count both K and V (a factor 2)"
                elif fn == "mla_cache_bytes" and got == 2 * want:
                    hint = ": MLA caches one latent shared by keys and values, not two tensors"
                elif kwargs and got * kwargs.get("batch", 1) * kwargs.get("bytes_per_elem", 2) == want * 2:
                    hint = ": use the batch and bytes_per_elem arguments"
                raise AssertionError(f"{call} ({what}) = {got}, expected {want} bytes ({want / 2**30:.4g} GiB){hint}")
    return "✔ 02.kv_bytes: KV-cache sizes match hand-computed figures for Llama 3, Mistral 7B and DeepSeek-V2/V3"


# ---------------------------------------------------------------- FlashAttention
class PeakTensorMemory(TorchFunctionMode):
    """Inside a ``with`` block, the bytes of the tensor storage created there: live, at peak, and
    the largest single storage (views and in-place results share an existing storage and are
    not counted). The same accounting as the lab's memory experiment."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.counted: set[int] = set()

    def _freed(self, pointer: int, nbytes: int) -> None:
        self.counted.discard(pointer)
        self.live -= nbytes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))} | self.counted
        for t in _tensors(out):
            storage = t.untyped_storage()
            if storage.data_ptr() not in known and storage.nbytes() > 0:
                self.counted.add(storage.data_ptr())
                self.live += storage.nbytes()
                self.peak, self.largest = max(self.peak, self.live), max(self.largest, storage.nbytes())
                weakref.finalize(storage, self._freed, storage.data_ptr(), storage.nbytes())
        return out


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors(y)]
    return []


def flash_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"qkv": torch.randn(3, 2, 3, 100, 16, generator=g), "qkv130": torch.randn(3, 1, 2, 130, 8, generator=g),
            "qkv256": torch.randn(3, 1, 2, 256, 8, generator=g), "big": 3000.0}


def flash_collect(inputs: dict, flash_attention) -> dict:
    q, k, v = inputs["qkv"].unbind(0)
    q2, k2, v2 = inputs["qkv130"].unbind(0)
    big = inputs["big"]
    out = {"plain": _call(flash_attention, q, k, v, block_size=32),
           "causal": _call(flash_attention, q, k, v, causal=True, block_size=32),
           "default_block": _call(flash_attention, q2, k2, v2, causal=True),
           "big": _call(flash_attention, q * big, k * big, v, causal=True, block_size=32)}
    q3, k3, v3 = inputs["qkv256"].unbind(0)
    with PeakTensorMemory() as memory:
        result = _call(flash_attention, q3, k3, v3, block_size=32)
    out["memory_result"] = result
    out["largest_tensor_bytes"] = memory.largest
    return out


def flash_verify(inputs: dict, out: dict) -> str:
    q, k, v = inputs["qkv"].double().unbind(0)
    q2, k2, v2 = inputs["qkv130"].double().unbind(0)
    sdpa = F.scaled_dot_product_attention
    hint = ("keep a running max m and sum l per query; for each key block: m_new = max(m, rowmax(s)), "
            "p = exp(s - m_new), alpha = exp(m - m_new), l = alpha·l + rowsum(p), acc = alpha·acc + p @ v_j; "
            "finally acc / l")
    cases = [("plain", "T = 100, block_size = 32 (T not a multiple of the block)", sdpa(q, k, v)),
             ("causal", "causal, T = 100, block_size = 32", sdpa(q, k, v, is_causal=True)),
             ("default_block", "causal, T = 130, default block_size", sdpa(q2, k2, v2, is_causal=True))]
    for name, what, want in cases:
        got = out[name]
        _raised(f"flash_attention, {what}", got)
        assert_close(f"flash_attention, {what} (vs F.scaled_dot_product_attention)", got, want, atol=1e-5, hint=hint)
    big = inputs["big"]
    got = out["big"]
    _raised("flash_attention with logits around 1e7", got)
    assert_close(f"flash_attention, causal, q and k scaled by {big:g} (logits around 1e7)", got,
                 sdpa(q * big, k * big, v, is_causal=True), atol=1e-4,
                 hint="exponentiate s - m_new, never s itself: the running max keeps every exponent <= 0")
    q3, k3, v3 = inputs["qkv256"].double().unbind(0)
    _raised("flash_attention, T = 256", out["memory_result"])
    assert_close("flash_attention, T = 256, block_size = 32", out["memory_result"], sdpa(q3, k3, v3), atol=1e-5)
    B, H, T = q3.shape[:3]
    full = B * H * T * T * 4  # bytes of the (B, H, T, T) float32 score matrix
    if out["largest_tensor_bytes"] >= full / 4:
        raise AssertionError(f"flash_attention with T = 256 and block_size = 32 created a tensor of "
                             f"{out['largest_tensor_bytes']} bytes, at least a quarter of the {full}-byte T × T score "
                             "matrix: compute the scores one (query block × key block) tile at a time")
    return ("✔ 02.flash: equals F.scaled_dot_product_attention (causal or not, T not a multiple of the block), "
            "finite at large logits, never forms the T × T matrix")


CHECKS = [
    Check("02.repeat_kv", repeat_kv_inputs, repeat_kv_collect, repeat_kv_verify),
    Check("02.gqa", gqa_inputs, gqa_collect, gqa_verify),
    Check("02.kv_cache", kv_cache_inputs, kv_cache_collect, kv_cache_verify),
    Check("02.generate", generate_inputs, generate_collect, generate_verify),
    Check("02.mla", mla_inputs, mla_collect, mla_verify),
    Check("02.mla_cache", mla_cache_inputs, mla_cache_collect, mla_cache_verify),
    Check("02.kv_bytes", kv_bytes_inputs, kv_bytes_collect, kv_bytes_verify),
    Check("02.flash", flash_inputs, flash_collect, flash_verify),
]
