"""Checks of Lab 2: GQA, the KV cache, MLA and FlashAttention, against PyTorch built-ins, closed forms and papers."""

import torch
import torch.nn.functional as F

from labkit.checks import (ATTENTION_BUILTINS, as_tensor, attention_weights, causal, compare, define, mla_weights,
                           raised, references as ref, seeded_generator, table)
from labkit.checks.kernel import ConcatCache, PeakTensorMemory, attempt, build, run_cases

repeat_kv = table(
    "02.repeat_kv", lambda g: [
        {"what": f"repeat_kv(x of shape {tuple(x.shape)}, n_rep={n}) (vs torch.repeat_interleave(x, n_rep, dim=1))",
         "args": [x, n]} for x in [torch.randn(2, 3, 5, 4, generator=g)] for n in (1, 2, 4)],
    lambda c: torch.repeat_interleave(*c["args"], dim=1),
    "KV head j serves query heads j·n_rep … j·n_rep + n_rep − 1, as in Llama", atol=0,
    hint="output head h must equal input head h // n_rep", forbid=("torch.repeat_interleave",),
    suspects=lambda c: {"it tiles the KV heads (0, 1, 2, 0, 1, 2, ...), like x.repeat: query head h must read KV head "
                        "h // n_rep, so each KV head is repeated n_rep times in place (0, 0, 1, 1, ...), as Llama's "
                        "x[:, :, None].expand(B, H_kv, n_rep, T, d).reshape(B, H_kv * n_rep, T, d) does":
                        c["args"][0].repeat(1, c["args"][1], 1, 1)})


def attention_collect(inputs: dict, Attention) -> dict:
    """GQA's and MLA's: each case's module with no mask, a causal mask, and a cache (prefill, then one token a step)."""
    x, mask, P, outputs = inputs["x"], inputs["causal"], inputs["prefill"], []
    for case in inputs["cases"]:
        attn = build(Attention, case["weights"], case["what"], *case["init"], **case["init_kwargs"])
        kw, cache = case.get("kwargs", {}), ConcatCache()  # not the student's cache; it shows what the module caches
        with torch.no_grad():
            steps = [attempt(attn, x[:, :P], mask=mask[:P, :P], cache=cache, **kw)]
            steps += [attempt(attn, x[:, t:t + 1], cache=cache, **kw) for t in range(P, x.shape[1])]
            failed = [s for s in steps if not isinstance(s, torch.Tensor)]
            outputs.append({"plain": attempt(attn, x, **kw), "causal": attempt(attn, x, mask=mask, **kw),
                            "cached": failed[0] if failed else attempt(torch.cat, steps, dim=1),
                            "numbers": sum(t.numel() for t in (cache.a, cache.b) if isinstance(t, torch.Tensor))})
    return {"outputs": outputs}


def gqa_inputs(seed: int, d_model: int = 32, T: int = 6,
               variants=(("MHA", 4, 4, False), ("GQA", 8, 2, True), ("MQA", 8, 1, False))) -> dict:
    g = seeded_generator(seed)  # variants: (name, n_heads, n_kv_heads, bias)
    cases = [{"what": f"{name}: GroupedQueryAttention({d_model}, {h}, {kv}, bias={bias})", "init": [d_model, h, kv],
              "init_kwargs": {"bias": bias}, "weights": attention_weights("", d_model, g, h, kv, bias, out="o_proj")}
             for name, h, kv, bias in variants]
    return {"cases": cases, "x": torch.randn(2, T, d_model, generator=g), "causal": causal(T), "prefill": 4}


@define("02.gqa", gqa_inputs, attention_collect, forbid=ATTENTION_BUILTINS)
def gqa(inputs: dict, out: dict) -> str:
    x, sdpa = inputs["x"], "F.scaled_dot_product_attention with enable_gqa=True"
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        w, (_, h, kv), bias = case["weights"], case["init"], case["init_kwargs"]["bias"]
        for key, mask in (("plain", None), ("causal", inputs["causal"])):
            compare(f"{case['what']}, {'no' if mask is None else 'causal'} mask (vs {sdpa})", got[key],
                    ref.gqa(w, x, h, kv, mask), hint="scale the scores by 1/sqrt(d_head), d_head = d_model // n_heads; "
                    "split q into n_heads and k, v into n_kv_heads heads, and repeat k, v with repeat_kv",
                    suspects={"query head h reads KV head h % n_kv_heads (heads tiled); it must read KV head "
                              "h // n_rep, as Llama's repeat_kv does": lambda: ref.gqa(w, x, h, kv, mask, tiled=True)})
        by, want = sdpa, ref.gqa(w, x, h, kv, inputs["causal"])
        if inputs.get("llama"):  # the hidden variant's
            by, want = "transformers' LlamaAttention", ref.llama_attention(w, x, h, kv, rope=False, bias=bias)
            compare(f"{case['what']}, causal mask (vs {by}, RoPE disabled)", got["causal"], want)
        compare(f"{case['what']} with a cache: prefill {inputs['prefill']} tokens (causal mask), then the others one "
                f"at a time; outputs must equal those of the full causal pass (vs {by})", got["cached"], want,
                hint="with a cache, call k, v = cache.update(k, v) before attending, so the new queries see every key")
    return "MHA, GQA and MQA match F.scaled_dot_product_attention(enable_gqa=True), with and without a cache"


def kv_cache_inputs(seed: int, shape=(2, 3, 4, 12), chunks=(5, 1, 1, 3), refill=(2,), other=("float64", 8)) -> dict:
    g, (B, H, d, _) = seeded_generator(seed), shape  # [k, v] of each update; after reset(), the refill's
    draw = lambda sizes: [list(torch.randn(2, B, H, T, d, generator=g)) for T in sizes]
    return {"shape": list(shape), "updates": draw(chunks), "refill": draw(refill), "dtype": other}


def kv_cache_collect(inputs: dict, KVCache) -> dict:
    B, H, d, max_len = inputs["shape"]
    cache = KVCache(B, max_len, H, d)

    def update(k, v):  # a copy of what update returns, and where the returned keys live
        k_all, v_all = cache.update(k, v)
        return {"k": k_all.clone(), "v": v_all.clone(), "storage": k_all.untyped_storage().data_ptr()}

    out = {"nbytes": [int(cache.nbytes)], "steps": [attempt(update, k, v) for k, v in inputs["updates"]]}
    out["nbytes"].append(int(cache.nbytes))
    cache.reset()
    out["refill"] = [attempt(update, k, v) for k, v in inputs["refill"]]
    out["nbytes_other"] = int(KVCache(B, max_len, H, d, dtype=getattr(torch, inputs["dtype"][0])).nbytes)
    return out


@define("02.kv_cache", kv_cache_inputs, kv_cache_collect)
def kv_cache(inputs: dict, out: dict) -> str:
    (B, H, d, max_len), sizes = inputs["shape"], [k.shape[2] for k, _ in inputs["updates"]]
    calls = [(f"call {i} (chunks of {sizes} tokens)", inputs["updates"][:i], step,
              "write the new tokens at positions [length, length + T) and return [:length + T]")
             for i, step in enumerate(out["steps"], 1)]
    calls += [("after reset()", inputs["refill"][:i], step, "reset() must set the number of cached tokens back to 0")
              for i, step in enumerate(out["refill"], 1)]
    for when, given, step, hint in calls:  # given: the [k, v] of each update since empty
        for name, want in zip("kv", [torch.cat(chunks, dim=2) for chunks in zip(*given)]):
            n = want.shape[2]
            compare(f"KVCache.update, {when}, {n} tokens so far: returned {name} (vs torch.cat of the {name} given "
                    f"since empty)", step.get(name, step), want, 0, hint, {f"the returned {name} lacks the first "
                    f"token: return positions 0 … {n - 1} of the buffer, not 1 … {n - 1}": want[:, :, 1:]})
    compare("KVCache.update returned the keys in a new tensor at different calls (distinct storages)",
            len({step["storage"] for step in out["steps"]}), 1, hint="write new tokens into the preallocated buffer "
            "and return a view of it (slicing); torch.cat copies it all each step")
    want, dtype = 2 * B * H * max_len * d * 4, inputs["dtype"]
    compare(f"KVCache({B}, max_len={max_len}, {H}, {d}).nbytes (empty, full)", out["nbytes"], [want, want], hint=f"It "
            f"must be 2 (K and V) × {B} × {H} × {max_len} × {d} × 4 bytes: the buffers, whatever is filled")
    compare(f"KVCache(..., dtype=torch.{dtype[0]}).nbytes", out["nbytes_other"], want // 4 * dtype[1],
            hint="allocate the buffers with the given dtype")
    return "update appends and returns every cached token, reset empties it, nbytes counts both buffers"


def generate_inputs(seed: int, prompt=(2, 5), new=(12,), **config) -> dict:
    config = {"vocab_size": 40, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "max_len": 24} | config
    return {"config": config, "seed": seed, "runs": [[n, use_cache] for n in new for use_cache in (False, True)],
            "prompt": torch.randint(config["vocab_size"], prompt, generator=seeded_generator(seed))}


def generate_collect(inputs: dict, Decoder, generate) -> dict:
    model, g = Decoder(**inputs["config"]).double().eval(), torch.Generator().manual_seed(inputs["seed"])
    forward, calls, runs = model.forward, [], []

    def recording_forward(idx, caches=None):  # records (tokens fed, whether caches were passed)
        calls.append((idx.shape[1], caches is not None))
        return forward(idx, caches)

    model.forward = recording_forward
    with torch.no_grad():
        for p in model.parameters():  # larger weights than at initialisation, so that every bug changes some argmax
            p.normal_(0.0, 0.4, generator=g)
        for new, use_cache in inputs["runs"]:
            calls.clear()
            tokens = attempt(generate, model, inputs["prompt"], new, use_cache=use_cache)
            runs.append({"tokens": tokens, "calls": list(calls),  # greedy decoding's reference: one full pass
                         "full_logits": attempt(lambda: forward(tokens[:, :-1]))})
    return {"runs": runs}


@define("02.generate", generate_inputs, generate_collect, forbid=ATTENTION_BUILTINS)
def generate(inputs: dict, out: dict) -> str:
    prompt, (B, T0) = inputs["prompt"], inputs["prompt"].shape
    for (new, use_cache), run in zip(inputs["runs"], out["runs"], strict=True):
        what = f"generate(model, prompt of shape {(B, T0)}, {new}, use_cache={use_cache})"
        advice = (": with a cache, every step must see all earlier tokens (prompt included) through the cache, so each "
                  "cache's update must return every cached token, the new ones too") if use_cache else ""
        if raised(run["tokens"]):
            raise AssertionError(f"{what} raised {raised(run['tokens'])}{advice}")
        tokens = as_tensor(what, run["tokens"], (B, T0 + new)).long()
        compare(f"{what}: the prompt, which the output must start with", tokens[:, :T0], prompt, atol=0)
        greedy = as_tensor("the logits of a full pass", run["full_logits"]).argmax(-1)[:, T0 - 1:]
        for t in torch.nonzero((tokens[:, T0:] != greedy).any(0)).flatten().tolist()[:1]:
            raise AssertionError(f"{what}: token {t} of the continuation is not the argmax of the logits that a full "
                                 f"forward pass over the tokens before it gives (greedy decoding){advice}")
        if use_cache and new:  # at least `new` calls: the prompt once, then the newest token alone, with the caches
            compare(f"{what}: (tokens fed, caches passed) at each call of the model", run["calls"],
                    [(T0, True)] + [(1, True)] * (max(len(run["calls"]), new) - 1), hint="it must pass the caches to "
                    "the model on every call (model(idx, caches) with caches = model.make_caches(batch_size)), feed "
                    f"the prompt once ({T0} tokens), then only the newest token (1) per step")
    return "cached greedy decoding gives exactly the tokens of full recomputation, one token per step"


MLA_HINTS = (  # the naive path's, the absorbed path's
    "q = q_b_proj(q_a_layernorm(q_a_proj(x))); [c_kv, k_pe] = kv_a_proj_with_mqa(x); decompress kv_a_layernorm(c_kv) "
    "with kv_b_proj; scale by 1/sqrt(qk_nope_head_dim + qk_rope_head_dim); one rope key is shared by all heads",
    "kv_b_proj.weight has shape (out, in) = (n_heads·(qk_nope_head_dim + v_head_dim), kv_lora_rank): view it as "
    "(n_heads, qk_nope_head_dim + v_head_dim, kv_lora_rank), split W_UK, W_UV along dim 1; q_nope @ W_UK is the query "
    "in latent space, the averaged latent @ W_UV^T the head's output; the scale stays 1/sqrt(qk_nope_head_dim + "
    "qk_rope_head_dim)")


def mla_inputs(seed: int, B=2, T=7, prefill=4, **config) -> dict:
    config = {"d_model": 32, "n_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
              "qk_rope_head_dim": 4, "v_head_dim": 6} | config
    g = seeded_generator(seed)
    w, x = mla_weights(config, g), torch.randn(B, T, config["d_model"], generator=g)
    cases = [{"what": f"MultiHeadLatentAttention, {path} path (absorb={absorb})", "init": [], "init_kwargs": config,
              "kwargs": {"absorb": absorb}, "weights": w} for path, absorb in (("naive", False), ("absorbed", True))]
    return {"config": config, "weights": w, "cases": cases, "x": x, "causal": causal(T), "prefill": prefill}


@define("02.mla", mla_inputs, attention_collect, forbid=ATTENTION_BUILTINS)
def mla(inputs: dict, out: dict) -> str:
    for case, got, hint in zip(inputs["cases"], out["outputs"], MLA_HINTS, strict=True):
        for key, mask in (("plain", None), ("causal", inputs["causal"])):  # the absorbed path's after the naive's
            compare(f"{case['what']}, {'no' if mask is None else 'causal'} mask (vs explicit decompression + F.scaled_"
                    f"dot_product_attention{', which your naive path matches' * case['kwargs']['absorb']})", got[key],
                    ref.mla(inputs["config"], inputs["weights"], inputs["x"], mask), hint=hint)
    return "the naive and absorbed paths agree, and match explicit decompression with F.scaled_dot_product_attention"


@define("02.mla_cache", mla_inputs, attention_collect, forbid=ATTENTION_BUILTINS)
def mla_cache(inputs: dict, out: dict) -> str:
    c, w, x = inputs["config"], inputs["weights"], inputs["x"]
    by, want = (("transformers' DeepseekV3Attention, RoPE disabled", ref.deepseek_v3_attention(c, w, x))
                if inputs.get("deepseek") else ("the full causal pass", ref.mla(c, w, x, inputs["causal"])))
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        compare(f"{case['what']}, causal mask (vs {by})", got["causal"], want)
        compare(f"{case['what']} with a cache: prefill {inputs['prefill']} tokens, then one at a time (vs {by})",
                got["cached"], want, hint="attend over everything cache.update returns")
        compare(f"{case['what']} with a cache: numbers the cache holds per token", got["numbers"] / x.shape[:2].numel(),
                float(c["kv_lora_rank"] + c["qk_rope_head_dim"]), hint="kv_lora_rank + qk_rope_head_dim: call cache."
                "update(c_kv, k_pe) with the compressed latent (B, T, kv_lora_rank) and the shared rope key (B, T, "
                "qk_rope_head_dim), before decompressing anything", suspects={
                    "it caches every head's decompressed keys and values: cache c_kv and k_pe, then decompress":
                    float(c["n_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"]))})
    return ("cached decoding matches the full pass, and the cache holds kv_lora_rank + qk_rope_head_dim numbers per "
            "token")


# Llama 3 (Dubey et al., 2024), Mistral 7B (Jiang et al., 2023), DeepSeek-V2 and -V3 (DeepSeek-AI: d_c 512, d_h^R 64)
KV, MLA = "kv_cache_bytes", "mla_cache_bytes"
KV_BYTES = [  # (function, model, arguments, keyword arguments, bytes computed by hand)
    (KV, "Llama 3 70B, 8192 tokens, bf16", (80, 8, 128, 8192), {}, 2 * 80 * 8 * 128 * 8192 * 2),  # 2.5 GiB
    (KV, "Llama 3 70B as if it had MHA (64 KV heads), 8192 tokens, bf16", (80, 64, 128, 8192), {}, 21_474_836_480),
    (KV, "Llama 3 8B, 131072 tokens, bf16", (32, 8, 128, 131072), {}, 17_179_869_184),  # 16 GiB
    (KV, "Mistral 7B, 4096 tokens, batch 4, fp32", (32, 8, 128, 4096), {"batch": 4, "bytes_per_elem": 4}, 4 * 2**30),
    (MLA, "DeepSeek-V2, 131072 tokens, bf16", (60, 512, 64, 131072), {}, 60 * 576 * 131072 * 2),  # 8.4375 GiB
    (MLA, "DeepSeek-V3, 8192 tokens, batch 2, fp8", (61, 512, 64, 8192), {"batch": 2, "bytes_per_elem": 1},
     575_668_224)]


def kv_bytes_suspects(c: dict) -> dict:
    want, elements = c["bytes"], c["kwargs"].get("batch", 1) * c["kwargs"].get("bytes_per_elem", 2)
    if c["fn"] == MLA:
        return {"MLA caches one latent shared by keys and values, not two tensors": 2 * want}
    return {"count both K and V (a factor 2)": want // 2,
            "use the batch and bytes_per_elem arguments": want * 2 // elements}


kv_bytes = table(  # "student": which of the check's two functions a case calls
    "02.kv_bytes", lambda g: [{"what": f"{fn}{args}{f' with {kw}' if kw else ''} ({model})", "fn": fn, "args": args,
                               "kwargs": kw, "student": (KV, MLA).index(fn), "bytes": want}
                              for fn, model, args, kw, want in KV_BYTES],
    lambda c: c["bytes"], "KV-cache sizes match hand-computed figures for Llama 3, Mistral 7B and DeepSeek-V2/V3",
    suspects=kv_bytes_suspects)


def flash_inputs(seed: int) -> dict:
    g, big, causal32 = seeded_generator(seed), 3000.0, {"causal": True, "block_size": 32}
    (q, k, v), qkv130 = torch.randn(3, 2, 3, 100, 16, generator=g), torch.randn(3, 1, 2, 130, 8, generator=g)
    return {"memory": list(torch.randn(3, 1, 2, 256, 8, generator=g)), "cases": [
        {"what": "T = 100, block_size = 32 (T not a multiple of the block)", "args": [q, k, v],
         "kwargs": {"block_size": 32}},
        {"what": "causal, T = 100, block_size = 32", "args": [q, k, v], "kwargs": causal32},
        {"what": "causal, T = 130, default block_size", "args": list(qkv130), "kwargs": {"causal": True}},
        {"what": f"causal, q and k scaled by {big:g} (logits around 1e7)", "args": [q * big, k * big, v],
         "kwargs": causal32, "atol": 1e-4,
         "hint": "exponentiate s - m_new, never s itself: the running max keeps every exponent <= 0"}]}


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
            raise AssertionError(f"flash_attention with T = {T} and block_size = 32 created a tensor of "
                                 f"{out['largest']} bytes, at least a quarter of the {full}-byte T × T score matrix: "
                                 "compute the scores one (query block × key block) tile at a time")
    return ("equals F.scaled_dot_product_attention (causal or not, T not a multiple of the block), finite at large "
            "logits, never forms the T × T matrix")
