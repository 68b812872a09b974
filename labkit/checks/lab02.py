"""Checks of Lab 2: attention variants, the KV cache and FlashAttention. References: ``torch.repeat_interleave``,
``F.scaled_dot_product_attention``, explicit MLA decompression, closed forms (greedy tokens are the argmax of a full pass;
what a cache holds per token) and hand-computed figures of published models; hidden variants add Llama and DeepSeek-V3."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.checks import as_tensor, attention_weights, causal, compare, define, raised, seeded_generator, table
from labkit.checks.factories import mla_weights
from labkit.checks import references as ref
from labkit.checks.kernel import ConcatCache, PeakTensorMemory, attempt, build, run_cases

ATTENTION_BUILTINS = ("F.scaled_dot_product_attention", "nn.MultiheadAttention")


# ---------------------------------------------------------------- repeat_kv
def repeat_kv_cases(g: torch.Generator) -> list[dict]:
    x = torch.randn(2, 3, 5, 4, generator=g)
    return [{"what": f"repeat_kv(x of shape {tuple(x.shape)}, n_rep={n}) (vs torch.repeat_interleave(x, n_rep, dim=1))",
             "args": [x, n]} for n in (1, 2, 4)]


repeat_kv = table(
    "02.repeat_kv", repeat_kv_cases, lambda c: torch.repeat_interleave(*c["args"], dim=1),
    "KV head j serves query heads j·n_rep … j·n_rep + n_rep − 1, as in Llama", atol=0,
    hint="output head h must equal input head h // n_rep", forbid=("torch.repeat_interleave",),
    suspects=lambda c: {"it tiles the KV heads (0, 1, 2, 0, 1, 2, ...), like x.repeat: query head h must read KV head "
                        "h // n_rep, so each KV head is repeated n_rep times in place (0, 0, 1, 1, ...), as Llama's "
                        "x[:, :, None].expand(B, H_kv, n_rep, T, d).reshape(B, H_kv * n_rep, T, d) does":
                        c["args"][0].repeat(1, c["args"][1], 1, 1)})


# ---------------------------------------------------------------- attention modules: GQA and MLA share a collect
def attention_collect(inputs: dict, Attention) -> dict:
    """Each case's module with no mask, with a causal mask, and with a cache (prefill, then one token at a time)."""
    x, mask, P, outputs = inputs["x"], inputs["causal"], inputs["prefill"], []
    for case in inputs["cases"]:
        attn, kw = build(Attention, case["weights"], case["what"], *case["init"], **case["init_kwargs"]), case["kwargs"]
        cache = ConcatCache()  # independent of the student's cache, and it shows what the module caches
        with torch.no_grad():
            steps = [attempt(attn, x[:, :P], mask=mask[:P, :P], cache=cache, **kw)]
            steps += [attempt(attn, x[:, t:t + 1], cache=cache, **kw) for t in range(P, x.shape[1])]
            failed = [s for s in steps if not isinstance(s, torch.Tensor)]
            outputs.append({"plain": attempt(attn, x, **kw), "causal": attempt(attn, x, mask=mask, **kw),
                            "cached": failed[0] if failed else attempt(torch.cat, steps, dim=1),
                            "numbers": sum(t.numel() for t in (cache.a, cache.b) if isinstance(t, torch.Tensor))})
    return {"outputs": outputs}


def gqa_inputs(seed: int, d_model: int = 32, T: int = 6, llama: bool = False,  # variants: name, n_heads, n_kv_heads, bias
               variants=(("MHA", 4, 4, False), ("GQA", 8, 2, True), ("MQA", 8, 1, False))) -> dict:
    g = seeded_generator(seed)
    cases = [{"what": f"{name}: GroupedQueryAttention({d_model}, {h}, {kv}, bias={bias})", "init": [d_model, h, kv],
              "init_kwargs": {"bias": bias}, "kwargs": {},
              "weights": attention_weights("", d_model, g, h, kv, bias, out="o_proj")} for name, h, kv, bias in variants]
    return {"cases": cases, "x": torch.randn(2, T, d_model, generator=g), "causal": causal(T), "prefill": 4,
            "llama": llama}  # llama: the hidden variant also compares the causal passes with LlamaAttention


@define("02.gqa", gqa_inputs, attention_collect, forbid=ATTENTION_BUILTINS)
def gqa(inputs: dict, out: dict) -> str:
    x, mask, sdpa = inputs["x"], inputs["causal"], "F.scaled_dot_product_attention with enable_gqa=True"
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        w, (_, h, kv), bias = case["weights"], case["init"], case["init_kwargs"]["bias"]
        for m, name in ((None, "no mask"), (mask, "causal mask")):
            compare(f"{case['what']}, {name} (vs {sdpa})", got["plain" if m is None else "causal"],
                    ref.gqa(w, x, h, kv, m), hint="scale the scores by 1/sqrt(d_head), d_head = d_model // n_heads; "
                    "split q into n_heads and k, v into n_kv_heads heads, and repeat k, v with repeat_kv",
                    suspects={"query head h reads KV head h % n_kv_heads (heads tiled); it must read KV head h // n_rep, "
                              "as Llama's repeat_kv does": lambda: ref.gqa(w, x, h, kv, m, tiled=True)})
        by, want = sdpa, ref.gqa(w, x, h, kv, mask)
        if inputs["llama"]:
            by, want = "transformers' LlamaAttention, RoPE disabled", ref.llama_attention(w, x, h, kv, rope=False, bias=bias)
            compare(f"{case['what']}, causal mask (vs {by})", got["causal"], want)
        compare(f"{case['what']}, with a cache: prefill {inputs['prefill']} tokens (causal mask), then the others one at "
                f"a time; outputs must equal those of the full causal pass (vs {by})", got["cached"], want,
                hint="with a cache, call k, v = cache.update(k, v) before attending, so the new queries see every key")
    return "MHA, GQA and MQA match F.scaled_dot_product_attention(enable_gqa=True), with and without a cache"


# ---------------------------------------------------------------- KV cache
def kv_cache_inputs(seed: int, shape=(2, 3, 4, 12), chunks=(5, 1, 1, 3), refill=(2,), other=("float64", 8)) -> dict:
    g, (B, H, d, _) = seeded_generator(seed), shape
    k, v = torch.randn(2, B, H, sum(chunks), d, generator=g)
    return {"shape": list(shape), "chunks": list(chunks), "refill": list(refill), "dtype": other, "k": k, "v": v}


def kv_cache_collect(inputs: dict, KVCache) -> dict:
    B, H, d, max_len = inputs["shape"]
    cache = KVCache(B, max_len, H, d)

    def update(k, v):  # a copy of what update returns, and where the returned keys live
        k_all, v_all = cache.update(k, v)
        return {"k": k_all.clone(), "v": v_all.clone(), "storage": k_all.untyped_storage().data_ptr()}

    def fill(a, b, chunks):
        return [attempt(update, a[:, :, e - T:e], b[:, :, e - T:e])
                for T, e in zip(chunks, torch.tensor(chunks).cumsum(0).tolist())]

    out = {"nbytes_empty": int(cache.nbytes), "steps": fill(inputs["k"], inputs["v"], inputs["chunks"]),
           "nbytes_full": int(cache.nbytes)}
    cache.reset()  # then keys and values swapped: a cache that kept its tokens shows
    out["refill"] = fill(inputs["v"], inputs["k"], inputs["refill"])[-1]
    out["nbytes_other"] = int(KVCache(B, max_len, H, d, dtype=getattr(torch, inputs["dtype"][0])).nbytes)
    return out


@define("02.kv_cache", kv_cache_inputs, kv_cache_collect)
def kv_cache(inputs: dict, out: dict) -> str:
    (B, H, d, max_len), k, v, n = inputs["shape"], inputs["k"], inputs["v"], sum(inputs["refill"])
    calls = [(f"call {i + 1} (chunks of {inputs['chunks']} tokens; {e} tokens so far)", k[:, :, :e], v[:, :, :e],
              "write the new tokens at positions [length, length + T) and return [:length + T]")
             for i, e in enumerate(torch.tensor(inputs["chunks"]).cumsum(0).tolist())]
    calls += [(f"after reset() and {n} new tokens", v[:, :, :n], k[:, :, :n],  # refilled with keys and values swapped
               "reset() must set the number of cached tokens back to 0")]
    for (when, *wants, hint), step in zip(calls, out["steps"] + [out["refill"]], strict=True):
        for name, want in zip("kv", wants):
            last = want.shape[2] - 1
            compare(f"KVCache.update, {when}: returned {name} (vs torch.cat of the {name} given since empty)",
                    step.get(name, step), want, 0, hint, {f"the returned {name} lacks the first token: return positions "
                                                          f"0 … {last} of the buffer, not 1 … {last}": want[:, :, 1:]})
    if len({step["storage"] for step in out["steps"]}) > 1:
        raise AssertionError("KVCache.update returned the keys in a new tensor at different calls: write new tokens into "
                             "the preallocated buffer and return a view of it (slicing); torch.cat copies it all each step")
    want = 2 * B * H * max_len * d * 4
    for name in ("empty", "full"):
        compare(f"KVCache({B}, max_len={max_len}, {H}, {d}).nbytes ({name})", out[f"nbytes_{name}"], want,
                hint=f"It must be 2 (K and V) × {B} × {H} × {max_len} × {d} × 4 bytes: the buffers, whatever is filled")
    compare(f"KVCache(..., dtype=torch.{inputs['dtype'][0]}).nbytes", out["nbytes_other"], want // 4 * inputs["dtype"][1],
            hint="allocate the buffers with the given dtype")
    return "update appends and returns every cached token, reset empties it, nbytes counts both buffers"


# ---------------------------------------------------------------- generation with a cache
def generate_inputs(seed: int, config=dict(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, max_len=24),
                    prompt=(2, 5), new=(12,)) -> dict:
    return {"config": dict(config), "seed": seed, "new": list(new),
            "prompt": torch.randint(config["vocab_size"], prompt, generator=seeded_generator(seed))}


def generate_collect(inputs: dict, Decoder, generate) -> dict:
    torch.manual_seed(inputs["seed"])
    model = Decoder(**inputs["config"]).double().eval()
    forward, calls, runs = model.forward, [], []

    def recording_forward(idx, caches=None):  # records (tokens fed, whether caches were passed)
        calls.append((idx.shape[1], caches is not None))
        return forward(idx, caches)

    model.forward = recording_forward
    with torch.no_grad():
        for p in model.parameters():  # larger weights than at initialisation, so that every bug changes some argmax
            p.normal_(0.0, 0.4)
        for new in inputs["new"]:
            for use_cache in (False, True):
                calls.clear()
                tokens = attempt(generate, model, inputs["prompt"], new, use_cache=use_cache)
                runs.append({"tokens": tokens, "calls": list(calls),  # greedy decoding's reference: one full pass
                             "full_logits": attempt(lambda: forward(tokens[:, :-1]))})
    return {"runs": runs}


@define("02.generate", generate_inputs, generate_collect, forbid=ATTENTION_BUILTINS)
def generate(inputs: dict, out: dict) -> str:
    prompt, (B, T0) = inputs["prompt"], inputs["prompt"].shape
    for (new, use_cache), run in zip([(n, c) for n in inputs["new"] for c in (False, True)], out["runs"], strict=True):
        what = f"generate(model, prompt of shape {(B, T0)}, {new}, use_cache={use_cache})"
        if raised(run["tokens"]) and use_cache:
            raise AssertionError(f"{what} raised {raised(run['tokens'])}. With caches, the model's causal mask has (cached "
                                 "+ new) columns: each cache's update must return every cached token, the new ones too")
        tokens = as_tensor(what, run["tokens"], (B, T0 + new)).long()
        compare(f"{what}: the prompt, which the output must start with", tokens[:, :T0], prompt, atol=0)
        greedy = as_tensor("the logits of a full pass", run["full_logits"]).argmax(-1)[:, T0 - 1:]
        for t in torch.nonzero((tokens[:, T0:] != greedy).any(0)).flatten().tolist()[:1]:
            raise AssertionError(f"{what}: token {t} of the continuation is not the argmax of the logits that a full "
                                 "forward pass over the tokens before it gives (greedy decoding)" + (
                                     ": with a cache, every step must see all earlier tokens (prompt included) "
                                     "through the cache" if use_cache else ""))
        fed, with_caches = zip(*run["calls"]) if run["calls"] else ((), ())
        if use_cache and new and not (with_caches and all(with_caches)):
            raise AssertionError("generate(..., use_cache=True) must pass the caches to the model on every call "
                                 "(model(idx, caches) with caches = model.make_caches(batch_size))")
        if use_cache and new and (fed[0] != T0 or any(T != 1 for T in fed[1:]) or len(fed) < new):
            raise AssertionError(f"generate(..., use_cache=True) fed the model {list(fed)} tokens per call: with a "
                                 f"cache, feed the prompt once ({T0} tokens), then only the newest token (1) per step")
    return "cached greedy decoding gives exactly the tokens of full recomputation, one token per step"


# ---------------------------------------------------------------- multi-head latent attention
def mla_inputs(seed: int, config=dict(d_model=32, n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                                      qk_rope_head_dim=4, v_head_dim=6), B=2, T=7, prefill=4, deepseek=False) -> dict:
    g = seeded_generator(seed)
    w, x = mla_weights(config, g), torch.randn(B, T, config["d_model"], generator=g)
    cases = [{"what": f"MultiHeadLatentAttention, {path} path (absorb={absorb})", "init": [], "init_kwargs": dict(config),
              "kwargs": {"absorb": absorb}, "weights": w} for path, absorb in (("naive", False), ("absorbed", True))]
    return {"config": dict(config), "weights": w, "cases": cases, "x": x, "causal": causal(T), "prefill": prefill,
            "deepseek": deepseek}  # deepseek: the hidden variant's reference


MLA_HINTS = ("q = q_b_proj(q_a_layernorm(q_a_proj(x))); [c_kv, k_pe] = kv_a_proj_with_mqa(x), normalise c_kv with "
             "kv_a_layernorm, decompress it with kv_b_proj; the scale is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim); "
             "the rope key is shared by all heads",  # the naive path's; the absorbed path's:
             "kv_b_proj.weight has shape (out, in) = (n_heads·(qk_nope_head_dim + v_head_dim), kv_lora_rank): view it as "
             "(n_heads, qk_nope_head_dim + v_head_dim, kv_lora_rank), split W_UK, W_UV along dim 1; q_nope @ W_UK is the "
             "query in latent space, the averaged latent @ W_UV^T the head's output; the scale stays "
             "1/sqrt(qk_nope_head_dim + qk_rope_head_dim)")


@define("02.mla", mla_inputs, attention_collect, forbid=ATTENTION_BUILTINS)
def mla(inputs: dict, out: dict) -> str:
    naive, absorbed = out["outputs"]
    for case, got, hint in zip(inputs["cases"], out["outputs"], MLA_HINTS, strict=True):
        for key, mask in (("plain", None), ("causal", inputs["causal"])):
            what = f"{case['what']}, {'no' if mask is None else 'causal'} mask"
            if got is absorbed and isinstance(naive[key], torch.Tensor):
                compare(f"{what}: absorbed path vs your naive path", got[key], naive[key], hint=hint)
            compare(f"{what} (vs explicit decompression + F.scaled_dot_product_attention)", got[key],
                    ref.mla(inputs["config"], inputs["weights"], inputs["x"], mask), hint=hint)
    return "the naive and absorbed paths agree, and match explicit decompression with F.scaled_dot_product_attention"


@define("02.mla_cache", mla_inputs, attention_collect, forbid=ATTENTION_BUILTINS)
def mla_cache(inputs: dict, out: dict) -> str:
    c, w, x = inputs["config"], inputs["weights"], inputs["x"]
    by, want = (("transformers' DeepseekV3Attention, RoPE disabled", ref.deepseek_v3_attention(c, w, x))
                if inputs["deepseek"] else ("the full causal pass", ref.mla(c, w, x, inputs["causal"])))
    per_token = c["kv_lora_rank"] + c["qk_rope_head_dim"]
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        compare(f"{case['what']}, causal mask (vs {by})", got["causal"], want)
        compare(f"{case['what']} with a cache: prefill {inputs['prefill']} tokens, then one at a time (vs {by})",
                got["cached"], want, hint="attend over everything cache.update returns")
        compare(f"{case['what']} with a cache: numbers the cache holds per token", got["numbers"] / x.shape[:2].numel(),
                float(per_token), hint=f"kv_lora_rank + qk_rope_head_dim = {c['kv_lora_rank']} + {c['qk_rope_head_dim']}"
                f" = {per_token}: call cache.update(c_kv, k_pe) with the compressed latent (B, T, kv_lora_rank) and the "
                "shared rope key (B, T, qk_rope_head_dim), before decompressing anything",
                suspects={"it caches every head's decompressed keys and values: cache c_kv and k_pe, then decompress":
                          float(c["n_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"]))})
    return "cached decoding matches the full pass, and the cache holds kv_lora_rank + qk_rope_head_dim numbers per token"


# ---------------------------------------------------------------- KV-cache size
# Published configurations: Llama 3 (Dubey et al., 2024), Mistral 7B (Jiang et al., 2023),
# DeepSeek-V2 (DeepSeek-AI, 2024: d_c = 512, d_h^R = 64, 60 layers) and DeepSeek-V3 (61 layers).
KV, MLA = "kv_cache_bytes", "mla_cache_bytes"
KV_BYTES = [  # (function, model, arguments, keyword arguments, bytes computed by hand)
    (KV, "Llama 3 70B, 8192 tokens, bf16", (80, 8, 128, 8192), {}, 2 * 80 * 8 * 128 * 8192 * 2),  # 2.5 GiB
    (KV, "Llama 3 70B as if it had MHA (64 KV heads), 8192 tokens, bf16", (80, 64, 128, 8192), {}, 21_474_836_480),
    (KV, "Llama 3 8B, 131072 tokens, bf16", (32, 8, 128, 131072), {}, 17_179_869_184),  # 16 GiB
    (KV, "Mistral 7B, 4096 tokens, batch 4, fp32", (32, 8, 128, 4096), {"batch": 4, "bytes_per_elem": 4}, 4 * 2**30),
    (MLA, "DeepSeek-V2, 131072 tokens, bf16", (60, 512, 64, 131072), {}, 60 * 576 * 131072 * 2),  # 8.4375 GiB
    (MLA, "DeepSeek-V3, 8192 tokens, batch 2, fp8", (61, 512, 64, 8192), {"batch": 2, "bytes_per_elem": 1}, 575_668_224)]


def kv_bytes_suspects(c: dict) -> dict:
    want, elements = c["bytes"], c["kwargs"].get("batch", 1) * c["kwargs"].get("bytes_per_elem", 2)
    if c["fn"] == MLA:
        return {"MLA caches one latent shared by keys and values, not two tensors": 2 * want}
    return {"count both K and V (a factor 2)": want // 2, "use the batch and bytes_per_elem arguments": want * 2 // elements}


kv_bytes = table(  # "student": which of the check's two functions a case calls
    "02.kv_bytes", lambda g: [{"what": f"{fn}{args}" + (f" with {kwargs}" if kwargs else "") + f" ({model})", "fn": fn,
                               "student": (KV, MLA).index(fn), "args": args, "kwargs": kwargs, "bytes": want}
                              for fn, model, args, kwargs, want in KV_BYTES],
    lambda c: c["bytes"], "KV-cache sizes match hand-computed figures for Llama 3, Mistral 7B and DeepSeek-V2/V3",
    suspects=kv_bytes_suspects)


# ---------------------------------------------------------------- FlashAttention
def flash_inputs(seed: int) -> dict:
    g, big = seeded_generator(seed), 3000.0
    (q, k, v), qkv130 = torch.randn(3, 2, 3, 100, 16, generator=g), torch.randn(3, 1, 2, 130, 8, generator=g)
    causal32 = {"causal": True, "block_size": 32}
    return {"cases": [{"what": "T = 100, block_size = 32 (T not a multiple of the block)", "args": [q, k, v],
                       "kwargs": {"block_size": 32}},
                      {"what": "causal, T = 100, block_size = 32", "args": [q, k, v], "kwargs": causal32},
                      {"what": "causal, T = 130, default block_size", "args": list(qkv130), "kwargs": {"causal": True}},
                      {"what": f"causal, q and k scaled by {big:g} (logits around 1e7)", "args": [q * big, k * big, v],
                       "kwargs": causal32, "atol": 1e-4,
                       "hint": "exponentiate s - m_new, never s itself: the running max keeps every exponent <= 0"}],
            "memory": list(torch.randn(3, 1, 2, 256, 8, generator=g))}


def flash_collect(inputs: dict, flash_attention) -> dict:
    out = run_cases(inputs, flash_attention)
    if "memory" in inputs:  # the largest tensor it creates (the hidden variant has no memory case)
        with PeakTensorMemory() as memory:
            out["memory"] = attempt(flash_attention, *inputs["memory"], block_size=32)
        out["largest"] = memory.largest
    return out


@define("02.flash", flash_inputs, flash_collect, forbid=ATTENTION_BUILTINS)
def flash(inputs: dict, out: dict) -> str:
    sdpa = lambda *qkv, causal=False, **_: F.scaled_dot_product_attention(*(t.double() for t in qkv), is_causal=causal)
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        compare(f"flash_attention, {case['what']} (vs F.scaled_dot_product_attention)", got,
                sdpa(*case["args"], **case["kwargs"]), case.get("atol", 1e-5), case.get("hint", "keep a running max m "
                "and sum l per query; for each key block: m_new = max(m, rowmax(s)), p = exp(s - m_new), alpha = "
                "exp(m - m_new), l = alpha·l + rowsum(p), acc = alpha·acc + p @ v_j; finally acc / l"))
    if "memory" in inputs:
        compare("flash_attention, T = 256, block_size = 32", out["memory"], sdpa(*inputs["memory"]))
        B, H, T = inputs["memory"][0].shape[:3]
        full = B * H * T * T * 4  # bytes of the (B, H, T, T) float32 score matrix
        if out["largest"] >= full / 4:
            raise AssertionError(f"flash_attention with T = {T} and block_size = 32 created a tensor of {out['largest']} "
                                 f"bytes, at least a quarter of the {full}-byte T × T score matrix: compute the scores "
                                 "one (query block × key block) tile at a time")
    return ("equals F.scaled_dot_product_attention (causal or not, T not a multiple of the block), finite at large "
            "logits, never forms the T × T matrix")
