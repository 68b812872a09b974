"""Hidden checks of Lab 2: the same API against Hugging Face's production modules, and edge cases (see README.md).

Their ``verify`` runs in the grader's process, which is where the Hugging Face references are imported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.checks import Check, assert_close, seeded_generator
from labkit.checks.lab02 import _linear, _mla_weights
from labkit.grade import HiddenCheck


def _additive_causal(T: int) -> torch.Tensor:
    return torch.zeros(T, T, dtype=torch.float64).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(),
                                                              float("-inf"))[None, None]


# ---------------------------------------------------------------- repeat_kv vs Hugging Face's
def repeat_kv_hf_inputs(seed: int) -> dict:
    return {"x": torch.randn(2, 3, 4, 5, generator=seeded_generator(seed)), "n_reps": [1, 3, 8]}


def repeat_kv_hf_collect(inputs, repeat_kv):
    x = inputs["x"].transpose(1, 2)  # (2, 4, 3, 5), not contiguous
    return {f"rep{n}": repeat_kv(x, n).contiguous() for n in inputs["n_reps"]}


def repeat_kv_hf_verify(inputs: dict, out: dict) -> str:
    from transformers.models.llama.modeling_llama import repeat_kv

    x = inputs["x"].transpose(1, 2)
    for n in inputs["n_reps"]:
        assert_close(f"repeat_kv on a non-contiguous (2, 4, 3, 5) input, n_rep={n} (vs transformers' Llama repeat_kv)",
                     out[f"rep{n}"], repeat_kv(x, n), atol=0)
    return "✔ 02.hidden.repeat_kv_hf"


# ---------------------------------------------------------------- GQA vs LlamaAttention
GQA_HF_CASES = {"h6kv3": (6, 3), "h6kv1": (6, 1)}


def gqa_llama_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model = 48
    weights = {}
    for name, (h, kv) in GQA_HF_CASES.items():
        d = d_model // h
        weights[name] = (_linear("q_proj", d_model, h * d, g, True) | _linear("k_proj", d_model, kv * d, g, True)
                         | _linear("v_proj", d_model, kv * d, g, True) | _linear("o_proj", h * d, d_model, g, True))
    return {"d_model": d_model, "cases": dict(GQA_HF_CASES), "weights": weights,
            "x": torch.randn(2, 5, d_model, generator=g)}


def gqa_llama_collect(inputs, GroupedQueryAttention):
    out = {}
    T = inputs["x"].shape[1]
    for name, (h, kv) in inputs["cases"].items():
        attn = GroupedQueryAttention(inputs["d_model"], h, kv, bias=True)
        attn.load_state_dict(inputs["weights"][name])
        with torch.no_grad():
            out[name] = attn(inputs["x"], mask=torch.ones(T, T, dtype=torch.bool).tril())
    return out


def gqa_llama_verify(inputs: dict, out: dict) -> str:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    x = inputs["x"].double()
    B, T, d_model = x.shape
    for name, (h, kv) in inputs["cases"].items():
        config = LlamaConfig(hidden_size=d_model, num_attention_heads=h, num_key_value_heads=kv, attention_bias=True)
        config._attn_implementation = "eager"
        llama = LlamaAttention(config, layer_idx=0).double().eval()
        llama.load_state_dict({k: v.double() for k, v in inputs["weights"][name].items()})
        d = d_model // h
        no_rope = (torch.ones(B, T, d, dtype=torch.float64), torch.zeros(B, T, d, dtype=torch.float64))  # cos, sin
        with torch.no_grad():
            want, _ = llama(x, no_rope, _additive_causal(T))
        assert_close(f"GroupedQueryAttention({d_model}, {h}, {kv}, bias=True), causal "
                     "(vs transformers' LlamaAttention with RoPE disabled)", out[name], want)
    return "✔ 02.hidden.gqa_llama"


# ---------------------------------------------------------------- MLA vs DeepseekV3Attention
MLA_HF_CONFIG = {"d_model": 24, "n_heads": 3, "q_lora_rank": 16, "kv_lora_rank": 12,
                 "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 5}


def mla_deepseek_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"config": dict(MLA_HF_CONFIG), "weights": _mla_weights(MLA_HF_CONFIG, g),
            "x": torch.randn(1, 6, MLA_HF_CONFIG["d_model"], generator=g)}


def mla_deepseek_collect(inputs, MultiHeadLatentAttention):
    class Cache:
        def __init__(self):
            self.a = self.b = None

        def update(self, a, b):
            self.a = a if self.a is None else torch.cat([self.a, a], dim=-2)
            self.b = b if self.b is None else torch.cat([self.b, b], dim=-2)
            return self.a, self.b

    mla = MultiHeadLatentAttention(**inputs["config"])
    mla.load_state_dict(inputs["weights"])
    x, T = inputs["x"], inputs["x"].shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    out = {}
    with torch.no_grad():
        for absorb in (False, True):
            out[f"full{absorb}"] = mla(x, mask=mask, absorb=absorb)
            cache = Cache()  # one token at a time from the start
            out[f"step{absorb}"] = torch.cat([mla(x[:, t:t + 1], cache=cache, absorb=absorb) for t in range(T)], dim=1)
    return out


def mla_deepseek_verify(inputs: dict, out: dict) -> str:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    c = inputs["config"]
    config = DeepseekV3Config(hidden_size=c["d_model"], num_attention_heads=c["n_heads"], num_key_value_heads=c["n_heads"],
                              q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"],
                              qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"],
                              v_head_dim=c["v_head_dim"], rope_interleave=False)
    config._attn_implementation = "eager"
    deepseek = DeepseekV3Attention(config, layer_idx=0).double().eval()
    deepseek.load_state_dict({k: v.double() for k, v in inputs["weights"].items()})
    x = inputs["x"].double()
    B, T, _ = x.shape
    r = c["qk_rope_head_dim"]
    no_rope = (torch.ones(B, T, r, dtype=torch.float64), torch.zeros(B, T, r, dtype=torch.float64))
    with torch.no_grad():
        want, _ = deepseek(x, no_rope, _additive_causal(T))
    for absorb in (False, True):
        path = "absorbed" if absorb else "naive"
        assert_close(f"MultiHeadLatentAttention, {path} path, causal (vs transformers' DeepseekV3Attention, RoPE "
                     "disabled)", out[f"full{absorb}"], want)
        assert_close(f"MultiHeadLatentAttention, {path} path, decoding one token at a time from an empty cache",
                     out[f"step{absorb}"], want)
    return "✔ 02.hidden.mla_deepseek"


# ---------------------------------------------------------------- flash_attention edge cases
def flash_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"one": torch.randn(3, 2, 1, 8, generator=g), "q37": torch.randn(1, 2, 37, 8, generator=g),
            "k100": torch.randn(1, 2, 100, 8, generator=g), "v100": torch.randn(1, 2, 100, 5, generator=g),
            "small": torch.randn(3, 20, 8, generator=g), "tiny": torch.randn(3, 2, 9, 4, generator=g)}


def flash_edge_collect(inputs, flash_attention):
    q1, k1, v1 = inputs["one"].unbind(0)
    qs, ks, vs = inputs["small"].unbind(0)
    qt, kt, vt = inputs["tiny"].unbind(0)
    return {"one": flash_attention(q1, k1, v1, causal=True, block_size=4),
            "cross": flash_attention(inputs["q37"], inputs["k100"], inputs["v100"], block_size=16),
            "small": flash_attention(qs, ks, vs, causal=True, block_size=64),
            "tiny": flash_attention(qt, kt, vt, causal=True, block_size=1)}


def flash_edge_verify(inputs: dict, out: dict) -> str:
    sdpa = F.scaled_dot_product_attention
    q1, k1, v1 = inputs["one"].double().unbind(0)
    assert_close("flash_attention, a single causal query", out["one"], sdpa(q1, k1, v1, is_causal=True))
    assert_close("flash_attention, 37 queries, 100 keys, values of width 5 (cross-attention)", out["cross"],
                 sdpa(inputs["q37"].double(), inputs["k100"].double(), inputs["v100"].double()))
    qs, ks, vs = inputs["small"].double().unbind(0)
    assert_close("flash_attention on (T, d) inputs with block_size > T, causal", out["small"],
                 sdpa(qs, ks, vs, is_causal=True))
    qt, kt, vt = inputs["tiny"].double().unbind(0)
    assert_close("flash_attention, causal, block_size=1", out["tiny"], sdpa(qt, kt, vt, is_causal=True))
    return "✔ 02.hidden.flash_edge"


# ---------------------------------------------------------------- KV cache edge cases
def kv_cache_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"k": torch.randn(1, 2, 6, 3, generator=g), "v": torch.randn(1, 2, 6, 3, generator=g)}


def kv_cache_edge_collect(inputs, KVCache):
    k, v = inputs["k"], inputs["v"]
    cache = KVCache(1, 6, 2, 3)
    full = cache.update(k, v)[0].clone()  # exactly max_len tokens at once
    cache.reset()
    cache.update(k[:, :, :3], v[:, :, :3])
    _, second = cache.update(k[:, :, 3:], v[:, :, 3:])
    half = KVCache(1, 6, 2, 3, dtype=torch.float16)
    return {"full": full, "second": second.clone(), "nbytes16": int(half.nbytes)}


def kv_cache_edge_verify(inputs: dict, out: dict) -> str:
    assert_close("KVCache filled to max_len in one update", out["full"], inputs["k"], atol=0)
    assert_close("KVCache after reset, then 3 + 3 tokens: returned v", out["second"], inputs["v"], atol=0)
    if out["nbytes16"] != 2 * 1 * 2 * 6 * 3 * 2:
        raise AssertionError(f"KVCache(1, 6, 2, 3, dtype=torch.float16).nbytes is {out['nbytes16']}, expected 144")
    return "✔ 02.hidden.kv_cache_edge"


# ---------------------------------------------------------------- generation edge cases
def generate_edge_inputs(seed: int) -> dict:
    config = {"vocab_size": 30, "d_model": 24, "n_heads": 6, "n_kv_heads": 3, "n_layers": 2, "max_len": 16}
    return {"config": config, "seed": seed, "prompt": torch.randint(30, (3, 4), generator=seeded_generator(seed))}


def generate_edge_collect(inputs, Decoder, generate):
    torch.manual_seed(inputs["seed"])
    model = Decoder(**inputs["config"]).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
        prompt = inputs["prompt"]
        longest = generate(model, prompt, 12, use_cache=True)  # prompt + new tokens == max_len
        logits = model(longest[:, :-1])
        none = [generate(model, prompt, 0, use_cache=c) for c in (True, False)]
    return {"longest": longest, "logits": logits, "none_cached": none[0], "none_plain": none[1]}


def generate_edge_verify(inputs: dict, out: dict) -> str:
    prompt = inputs["prompt"]
    want = torch.cat([prompt, out["logits"].argmax(-1)[:, prompt.shape[1] - 1:]], dim=1)
    if not torch.equal(out["longest"], want):
        raise AssertionError("cached greedy decoding up to exactly max_len tokens, batch of 3, does not give the "
                             "argmax of a full forward pass at every step")
    for name in ("none_cached", "none_plain"):
        if not torch.equal(out[name], prompt):
            raise AssertionError(f"generate(model, idx, 0, use_cache={name == 'none_cached'}) must return idx unchanged")
    return "✔ 02.hidden.generate_edge"


HIDDEN = [
    HiddenCheck(Check("02.hidden.repeat_kv_hf", repeat_kv_hf_inputs, repeat_kv_hf_collect, repeat_kv_hf_verify),
                ("repeat_kv",), 1),
    HiddenCheck(Check("02.hidden.gqa_llama", gqa_llama_inputs, gqa_llama_collect, gqa_llama_verify),
                ("GroupedQueryAttention",), 1),
    HiddenCheck(Check("02.hidden.mla_deepseek", mla_deepseek_inputs, mla_deepseek_collect, mla_deepseek_verify),
                ("MultiHeadLatentAttention",), 1),
    HiddenCheck(Check("02.hidden.flash_edge", flash_edge_inputs, flash_edge_collect, flash_edge_verify),
                ("flash_attention",), 1),
    HiddenCheck(Check("02.hidden.kv_cache_edge", kv_cache_edge_inputs, kv_cache_edge_collect, kv_cache_edge_verify),
                ("KVCache",), 1),
    HiddenCheck(Check("02.hidden.generate_edge", generate_edge_inputs, generate_edge_collect, generate_edge_verify),
                ("Decoder", "generate"), 1),
]
