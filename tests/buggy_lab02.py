"""Plausible wrong implementations of Lab 2, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- repeat_kv
def repeat_kv_tiled(ns):
    return lambda x, n_rep: x.repeat(1, n_rep, 1, 1)  # BUG: repeat instead of repeat_interleave


def repeat_kv_time_axis(ns):
    def repeat_kv(x, n_rep):
        B, H_kv, T, d = x.shape
        return x[:, :, :, None].expand(B, H_kv, T, n_rep, d).reshape(B, H_kv, T * n_rep, d)  # BUG: repeats along time
    return repeat_kv


def repeat_kv_calls_the_builtin(ns):
    return lambda x, n_rep: torch.repeat_interleave(x, n_rep, dim=1)  # BUG: the built-in the exercise asks to write


def repeat_kv_hides_the_builtin(ns):
    def repeat_kv(x, n_rep):  # BUG: tries the built-in, and falls back to its own code when it fails
        try:
            return x.repeat_interleave(n_rep, dim=1)
        except Exception:
            return ns["repeat_kv"](x, n_rep)
    return repeat_kv


def repeat_kv_expand_wrong_axis(ns):
    def repeat_kv(x, n_rep):
        B, H_kv, T, d = x.shape
        return x[:, None].expand(B, n_rep, H_kv, T, d).reshape(B, H_kv * n_rep, T, d)  # BUG: new axis before the heads
    return repeat_kv


# ---------------------------------------------------------------- grouped-query attention
def gqa_tiled_heads(ns):
    class GQA(ns["GroupedQueryAttention"]):
        def forward(self, x, mask=None, cache=None):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
            k = self.k_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)
            v = self.v_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v)
            n_rep = self.n_heads // self.n_kv_heads
            out = ns["attention"](q, k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1), mask)  # BUG: tiled
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
    return GQA


def _projected(attn, x, cache):
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.d_head).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.d_head).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.d_head).transpose(1, 2)
    return (q, *cache.update(k, v)) if cache is not None else (q, k, v)


def _sdpa_gqa(ns):
    class GQA(ns["GroupedQueryAttention"]):
        def forward(self, x, mask=None, cache=None):
            q, k, v = _projected(self, x, cache)  # BUG: PyTorch's fused attention instead of your own
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))
    return GQA


def gqa_calls_sdpa(ns):
    return _sdpa_gqa(ns)


def gqa_hides_sdpa(ns):
    class GQA(ns["GroupedQueryAttention"]):
        def forward(self, x, mask=None, cache=None):  # BUG: tries the built-in, and falls back to its own code
            try:
                q, k, v = _projected(self, x, None)
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            except Exception:
                pass
            return super().forward(x, mask, cache)
    return GQA


def gqa_wraps_nn_multihead(ns):
    class GQA(ns["GroupedQueryAttention"]):
        def forward(self, x, mask=None, cache=None):  # BUG: PyTorch's module, its K and V weights repeated per group
            n_rep, d = self.n_heads // self.n_kv_heads, self.n_heads * self.d_head
            repeat = lambda w: w.view(self.n_kv_heads, 1, self.d_head, -1).expand(-1, n_rep, -1, -1).reshape(d, -1)
            m = nn.MultiheadAttention(d, self.n_heads, bias=self.q_proj.bias is not None, batch_first=True)
            with torch.no_grad():
                m.in_proj_weight.copy_(torch.cat([self.q_proj.weight, repeat(self.k_proj.weight),
                                                  repeat(self.v_proj.weight)]))
                if self.q_proj.bias is not None:
                    m.in_proj_bias.copy_(torch.cat([self.q_proj.bias, repeat(self.k_proj.bias[:, None])[:, 0],
                                                    repeat(self.v_proj.bias[:, None])[:, 0]]))
                    m.out_proj.bias.copy_(self.o_proj.bias)
                m.out_proj.weight.copy_(self.o_proj.weight)
            return m(x, x, x, attn_mask=None if mask is None else ~mask, need_weights=False)[0]
    return GQA


def gqa_ignores_cache(ns):
    class GQA(ns["GroupedQueryAttention"]):
        def forward(self, x, mask=None, cache=None):
            return super().forward(x, mask)  # BUG: never reads or writes the cache
    return GQA


def gqa_scaled_by_d_model(ns):
    def attention(q, k, v, mask=None):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1] * q.shape[-3])  # BUG: sqrt(H d), not sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v

    class GQA(ns["GroupedQueryAttention"]):
        def forward(self, x, mask=None, cache=None):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
            k = self.k_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)
            v = self.v_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v)
            n_rep = self.n_heads // self.n_kv_heads
            out = attention(q, ns["repeat_kv"](k, n_rep), ns["repeat_kv"](v, n_rep), mask)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
    return GQA


def gqa_kv_heads_as_query_heads(ns):
    base = ns["GroupedQueryAttention"]

    class GQA(base):
        def __init__(self, d_model, n_heads, n_kv_heads, bias=False):
            super().__init__(d_model, n_heads, n_heads, bias)  # BUG: k_proj and v_proj keep n_heads heads
    return GQA


# ---------------------------------------------------------------- KV cache
def kv_cache_drops_first_token(ns):
    class KVCache(ns["KVCache"]):
        def update(self, k, v):
            k_all, v_all = super().update(k, v)
            return k_all[:, :, 1:], v_all[:, :, 1:]  # BUG: drops the first token
    return KVCache


def kv_cache_overwrites(ns):
    class KVCache(ns["KVCache"]):
        def update(self, k, v):
            T = k.shape[2]
            self.k[:, :, :T], self.v[:, :, :T] = k, v  # BUG: always writes at position 0
            self.length = max(self.length, T)
            return self.k[:, :, :self.length], self.v[:, :, :self.length]
    return KVCache


def kv_cache_reset_noop(ns):
    class KVCache(ns["KVCache"]):
        def reset(self):
            pass  # BUG: the cache keeps its tokens
    return KVCache


def kv_cache_nbytes_k_only(ns):
    class KVCache(ns["KVCache"]):
        @property
        def nbytes(self):
            return self.k.nbytes  # BUG: forgets the values
    return KVCache


def kv_cache_ignores_dtype(ns):
    base = ns["KVCache"]

    class KVCache(base):
        def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
            super().__init__(batch_size, max_len, n_kv_heads, head_dim, torch.float32, device)  # BUG: ignores dtype
    return KVCache


def kv_cache_concatenates(ns):
    base = ns["KVCache"]

    class KVCache(base):
        def update(self, k, v):
            if self.length == 0:
                self.k_all, self.v_all = k, v
            else:  # BUG: grows by concatenation, copying the whole cache at every step
                self.k_all, self.v_all = torch.cat([self.k_all, k], dim=2), torch.cat([self.v_all, v], dim=2)
            self.length += k.shape[2]
            return self.k_all, self.v_all
    return KVCache


# ---------------------------------------------------------------- generation
def _decoder_with_cache(ns, cache_class):
    """The solution's Decoder, but whose make_caches builds caches of another class."""
    class Decoder(ns["Decoder"]):
        def make_caches(self, batch_size):
            w = self.tok_emb.weight
            return [cache_class(batch_size, self.max_len, self.n_kv_heads, self.d_head, w.dtype, w.device)
                    for _ in self.blocks]
    return Decoder


def generate_cache_drops_first_token(ns):
    return _decoder_with_cache(ns, kv_cache_drops_first_token(ns)), ns["generate"]


def generate_cache_forgets_history(ns):
    class KVCache(ns["KVCache"]):
        def update(self, k, v):
            super().update(k, v)
            return k, v  # BUG: returns only the new keys and values
    return _decoder_with_cache(ns, KVCache), ns["generate"]


def generate_with_sdpa_attention(ns):
    class Decoder(ns["Decoder"]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for block in self.blocks:
                block.attn.__class__ = _sdpa_gqa(ns)  # BUG: the model's attention is PyTorch's fused kernel
    return Decoder, ns["generate"]


def generate_without_caches(ns):
    @torch.no_grad()
    def generate(model, idx, max_new_tokens, use_cache=True):
        for _ in range(max_new_tokens):  # BUG: use_cache=True never makes or passes caches
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx
    return ns["Decoder"], generate


def generate_refeeds_everything(ns):
    @torch.no_grad()
    def generate(model, idx, max_new_tokens, use_cache=True):
        if not use_cache:
            return ns["generate"](model, idx, max_new_tokens, use_cache=False)
        for _ in range(max_new_tokens):  # BUG: "uses" a cache but recomputes the whole prefix each step
            caches = model.make_caches(idx.shape[0])
            logits = model(idx, caches)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx
    return ns["Decoder"], generate


def generate_skips_prefill(ns):
    @torch.no_grad()
    def generate(model, idx, max_new_tokens, use_cache=True):
        if not use_cache:
            return ns["generate"](model, idx, max_new_tokens, use_cache=False)
        caches = model.make_caches(idx.shape[0])
        logits = model(idx[:, -1:], caches)  # BUG: only the last prompt token goes through the model
        for _ in range(max_new_tokens):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, next_token], dim=1)
            logits = model(next_token, caches)
        return idx
    return ns["Decoder"], generate


# ---------------------------------------------------------------- MLA
def mla_absorbed_wrong_transpose(ns):
    class MLA(ns["MultiHeadLatentAttention"]):
        def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask=None):
            B, H, T, _ = q_nope.shape
            n, r = self.qk_nope_head_dim, self.kv_lora_rank
            # BUG: reads the (out, in) nn.Linear weight as if it were (in, out)
            W = self.kv_b_proj.weight.reshape(r, H, n + self.v_head_dim).permute(1, 2, 0)
            W_UK, W_UV = W[:, :n], W[:, n:]
            c = c_kv.unsqueeze(1)
            scores = ((q_nope @ W_UK) @ c.transpose(-2, -1) + q_pe @ k_pe.unsqueeze(1).transpose(-2, -1)) * self.scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = (scores.softmax(-1) @ c) @ W_UV.transpose(-2, -1)
            return out.transpose(1, 2).reshape(B, T, -1)
    return MLA


def mla_absorbed_latent_scale(ns):
    base = ns["MultiHeadLatentAttention"]

    class MLA(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # BUG: the absorbed query lives in the latent space, but the scale is still 1/sqrt(d_nope + d_R)
            self.scale = 1 / math.sqrt(self.kv_lora_rank + self.qk_rope_head_dim)
    return MLA


def mla_no_kv_norm(ns):
    class MLA(ns["MultiHeadLatentAttention"]):
        def project(self, x):
            q_nope, q_pe, _, k_pe = super().project(x)
            c_kv = self.kv_a_proj_with_mqa(x)[..., :self.kv_lora_rank]  # BUG: the latent is not normalised
            return q_nope, q_pe, c_kv, k_pe
    return MLA


def mla_naive_calls_sdpa(ns):
    class MLA(ns["MultiHeadLatentAttention"]):
        def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask=None):
            B, H, T, _ = q_nope.shape
            S = c_kv.shape[1]
            k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, -1).transpose(1, 2).split(
                [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, H, S, -1)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)  # BUG: PyTorch's fused attention instead of your own
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return out.transpose(1, 2).reshape(B, T, -1)
    return MLA


def mla_cache_hides_sdpa(ns):
    class MLA(ns["MultiHeadLatentAttention"]):
        def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask=None):  # BUG: tries the built-in, then falls back
            try:
                return mla_naive_calls_sdpa(ns).attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask)
            except Exception:
                return super().attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
    return MLA


def mla_caches_decompressed(ns):
    class MLA(ns["MultiHeadLatentAttention"]):
        def forward(self, x, mask=None, cache=None, absorb=False):
            q_nope, q_pe, c_kv, k_pe = self.project(x)
            if cache is None:
                return super().forward(x, mask, None, absorb)
            B, T, _ = x.shape
            # BUG: caches the decompressed per-head keys and values, as a straightforward port does
            kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, -1).transpose(1, 2)
            k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.n_heads, -1, -1)], dim=-1)
            k, v = cache.update(k, v)
            q = torch.cat([q_nope, q_pe], dim=-1)
            scores = q @ k.transpose(-2, -1) * self.scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = scores.softmax(-1) @ v
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
    return MLA


def mla_cache_ignored(ns):
    class MLA(ns["MultiHeadLatentAttention"]):
        def forward(self, x, mask=None, cache=None, absorb=False):
            if cache is not None:
                cache.update(*self.project(x)[2:])  # BUG: writes the cache but attends only to the new tokens
            return super().forward(x, mask, None, absorb)
    return MLA


# ---------------------------------------------------------------- kv_cache_bytes
def kv_bytes_no_factor_two(ns):
    def kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch=1, bytes_per_elem=2):
        return n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per_elem  # BUG: K only
    return kv_cache_bytes, ns["mla_cache_bytes"]


def kv_bytes_ignores_arguments(ns):
    def kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch=1, bytes_per_elem=2):
        return 2 * n_layers * n_kv_heads * head_dim * seq_len * 2  # BUG: ignores batch and bytes_per_elem
    return kv_cache_bytes, ns["mla_cache_bytes"]


def mla_bytes_twice(ns):
    def mla_cache_bytes(n_layers, kv_lora_rank, qk_rope_head_dim, seq_len, batch=1, bytes_per_elem=2):
        return 2 * n_layers * (kv_lora_rank + qk_rope_head_dim) * seq_len * batch * bytes_per_elem  # BUG: "K and V"
    return ns["kv_cache_bytes"], mla_cache_bytes


# ---------------------------------------------------------------- flash attention
def _flash(q, k, v, causal=False, block_size=64, rescale=True, subtract_max=True, last_partial=True, diagonal=0):
    """A configurable tiled attention, to plant one bug at a time."""
    T_q, T_k = q.shape[-2], k.shape[-2]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    stop_q = T_q if last_partial else T_q - T_q % block_size
    for i in range(0, stop_q, block_size):
        q_i = q[..., i:i + block_size, :] / math.sqrt(q.shape[-1])
        m = torch.full((*q_i.shape[:-1], 1), float("-inf"), dtype=q.dtype)
        l = torch.zeros_like(m)
        acc = torch.zeros(*q_i.shape[:-1], v.shape[-1], dtype=q.dtype)
        for j in range(0, min(T_k, i + q_i.shape[-2]) if causal else T_k, block_size):
            s = q_i @ k[..., j:j + block_size, :].transpose(-2, -1)
            if causal:
                rows = torch.arange(i, i + s.shape[-2])[:, None]
                cols = torch.arange(j, j + s.shape[-1])[None, :]
                s = s.masked_fill(cols > rows + diagonal, float("-inf"))
            if subtract_max:
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                p = torch.exp(s - m_new)
                alpha = torch.exp(m - m_new) if rescale else torch.ones_like(m)
            else:
                m_new, p, alpha = m, torch.exp(s), torch.ones_like(m)
            l = alpha * l + p.sum(-1, keepdim=True)
            acc = alpha * acc + p @ v[..., j:j + block_size, :]
            m = m_new
        out[..., i:i + block_size, :] = acc / l
    return out


def flash_no_rescaling(ns):
    return lambda q, k, v, causal=False, block_size=64: _flash(q, k, v, causal, block_size, rescale=False)


def flash_no_max(ns):
    return lambda q, k, v, causal=False, block_size=64: _flash(q, k, v, causal, block_size, subtract_max=False)


def flash_drops_last_block(ns):
    return lambda q, k, v, causal=False, block_size=64: _flash(q, k, v, causal, block_size, last_partial=False)


def flash_causal_off_by_one(ns):
    return lambda q, k, v, causal=False, block_size=64: _flash(q, k, v, causal, block_size, diagonal=-1)


def flash_calls_sdpa(ns):
    def flash_attention(q, k, v, causal=False, block_size=64):  # BUG: PyTorch's fused attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return flash_attention


def flash_hides_sdpa(ns):
    def flash_attention(q, k, v, causal=False, block_size=64):  # BUG: tries the built-in, then falls back
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        except Exception:
            return ns["flash_attention"](q, k, v, causal, block_size)
    return flash_attention


def flash_full_matrix(ns):
    def flash_attention(q, k, v, causal=False, block_size=64):  # BUG: forms the whole T x T matrix
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril() if causal else None
        return ns["attention"](q, k, v, mask)
    return flash_attention


# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "02.repeat_kv": [(repeat_kv_tiled, r"tiles the KV heads .*expand\(B, H_kv, n_rep, T, d\)"),
                     (repeat_kv_calls_the_builtin, r"your code calls torch.repeat_interleave"),
                     (repeat_kv_hides_the_builtin, r"your code calls torch.repeat_interleave"),
                     (repeat_kv_time_axis, r"n_rep=2\) .*shape \(2, 3, 10, 4\), expected \(2, 6, 5, 4\)"),
                     (repeat_kv_expand_wrong_axis, r"tiles the KV heads")],
    "02.gqa": [(gqa_tiled_heads, r"GQA: .*reads KV head h % n_kv_heads"),
               (gqa_calls_sdpa, r"your code calls F.scaled_dot_product_attention"),
               (gqa_hides_sdpa, r"your code calls F.scaled_dot_product_attention"),
               (gqa_wraps_nn_multihead, r"your code calls nn.MultiheadAttention"),
               (gqa_ignores_cache, r"with a cache: prefill 4 tokens.*cache.update"),
               (gqa_scaled_by_d_model, r"MHA: .*no mask.*max \|difference\|.*1/sqrt\(d_head\)"),
               (gqa_kv_heads_as_query_heads, r"GroupedQueryAttention\(32, 8, 2, bias=True\): parameters must be exactly.*k_proj.weight \(8, 32\)")],
    "02.kv_cache": [(kv_cache_drops_first_token, r"call 1 .*lacks the first token"),
                    (kv_cache_overwrites, r"call 2 .*returned k"),
                    (kv_cache_reset_noop, r"after reset\(\).*reset\(\) must set"),
                    (kv_cache_nbytes_k_only, r"nbytes \(empty, full\): \[\d+, \d+\], expected \[\d+, \d+\]\. It must be 2 \(K and V\)"),
                    (kv_cache_ignores_dtype, r"dtype=torch.float64\).nbytes"),
                    (kv_cache_concatenates, r"new tensor at different calls.*torch.cat")],
    "02.generate": [(generate_cache_drops_first_token, r"use_cache=True\) raised .*must return every cached token"),
                    (generate_cache_forgets_history, r"use_cache=True\) raised .*must return every cached token"),
                    (generate_with_sdpa_attention, r"your code calls F.scaled_dot_product_attention"),
                    (generate_without_caches, r"must pass the caches to the model on every call"),
                    (generate_refeeds_everything, r"caches passed\) at each call of the model: \[\(5, True\), \(6, True\), \(7, True\)"),
                    (generate_skips_prefill, r"use_cache=True\): \(tokens fed, caches passed\) .*: \[\(1, True\).*feed the prompt once \(5 tokens\)")],
    "02.mla": [(mla_absorbed_wrong_transpose, r"absorbed path .*which your naive path matches.*view it as"),
               (mla_absorbed_latent_scale, r"absorbed path .*which your naive path matches.*scale stays 1/sqrt\(qk_nope_head_dim \+ qk_rope_head_dim\)"),
               (mla_no_kv_norm, r"naive path .*kv_a_layernorm"),
               (mla_naive_calls_sdpa, r"your code calls F.scaled_dot_product_attention")],
    "02.mla_cache": [(mla_caches_decompressed, r"naive path \(absorb=False\) with a cache: numbers the cache holds per token: "
                                               r"72.0, expected 20.0\. "
                                               r"it caches every head's decompressed keys and values"),
                     (mla_cache_hides_sdpa, r"your code calls F.scaled_dot_product_attention"),
                     (mla_cache_ignored, r"naive path \(absorb=False\) with a cache: prefill 4 tokens.*attend over everything")],
    "02.kv_bytes": [(kv_bytes_no_factor_two, r"Llama 3 70B, 8192 tokens.*count both K and V"),
                    (kv_bytes_ignores_arguments, r"Mistral 7B.*use the batch and bytes_per_elem"),
                    (mla_bytes_twice, r"DeepSeek-V2.*one latent shared by keys and values")],
    "02.flash": [(flash_no_rescaling, r"T = 100, block_size = 32 .*max \|difference\|.*alpha"),
                 (flash_no_max, r"logits around 1e7.*non-finite"),
                 (flash_drops_last_block, r"T = 100, block_size = 32 \(T not a multiple"),
                 (flash_causal_off_by_one, r"causal, T = 100"),
                 (flash_full_matrix, r"created a tensor of \d+ bytes"),
                 (flash_calls_sdpa, r"your code calls F.scaled_dot_product_attention"),
                 (flash_hides_sdpa, r"your code calls F.scaled_dot_product_attention")],
}
