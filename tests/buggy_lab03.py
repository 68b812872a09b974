"""Plausible wrong implementations of Lab 3, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- sinusoidal encoding
def _sinusoid(T, d, base, first=torch.sin, second=torch.cos, exponent=lambda i, d: i / d, layout="interleaved",
              second_uses_position=True):
    p = torch.arange(T, dtype=torch.float32)[:, None]
    w = base ** (-exponent(torch.arange(0, d, 2, dtype=torch.float32), d))
    a, b = first(p * w), second((p if second_uses_position else torch.ones_like(p)) * w)
    if layout == "concatenated":
        return torch.cat([a, b], dim=-1)
    pe = torch.empty(T, d)
    pe[:, 0::2], pe[:, 1::2] = a, b
    return pe


def sinusoid_sin_cos_swapped(ns):
    return lambda T, d, base=10000.0: _sinusoid(T, d, base, first=torch.cos, second=torch.sin)  # BUG


def sinusoid_concatenated(ns):
    return lambda T, d, base=10000.0: _sinusoid(T, d, base, layout="concatenated")  # BUG: sines, then cosines


def sinusoid_exponent_i_over_d(ns):
    # BUG: w_i = base^(-i/d) with i = 0, 1, 2, ... instead of base^(-2i/d)
    return lambda T, d, base=10000.0: _sinusoid(T, d, base, exponent=lambda i, d: i / 2 / d)


def sinusoid_cos_without_position(ns):
    return lambda T, d, base=10000.0: _sinusoid(T, d, base, second_uses_position=False)  # BUG: cos(w), not cos(p w)


def sinusoid_ignores_base(ns):
    return lambda T, d, base=10000.0: _sinusoid(T, d, 10000.0)  # BUG: the base argument is ignored


# ---------------------------------------------------------------- RoPE
def _rotate_every_two(x):
    """GPT-J's rotation of neighbouring pairs (x_2i, x_2i+1) -> (-x_2i+1, x_2i)."""
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def rope_pairs_with_half_table(ns):
    # BUG: rotates neighbouring pairs (i, i+1) but keeps the rotate-half cos/sin tables
    return ns["rotate_half"], ns["rope_cos_sin"], lambda x, cos, sin: x * cos + _rotate_every_two(x) * sin


def rope_interleaved_layout(ns):
    def apply_rope(x, cos, sin):  # BUG: the paper's interleaved rotation, a different layout from Llama's
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return ns["rotate_half"], ns["rope_cos_sin"], apply_rope


def rotate_half_no_minus(ns):
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x2, x1), dim=-1)  # BUG: no minus sign
    return rotate_half, ns["rope_cos_sin"], lambda x, cos, sin: x * cos + rotate_half(x) * sin


def _rope_cos_sin(theta_fn=None, table="half", positions_dtype=torch.float32, use_positions=True):
    def rope_cos_sin(T, head_dim, base=10000.0, position_ids=None, scaling=None):
        theta = theta_fn(head_dim, base) if theta_fn else base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        if position_ids is None or not use_positions:
            position_ids = torch.arange(T)
        angles = position_ids.to(positions_dtype).float()[:, None] * theta[None, :]
        emb = torch.cat([angles, angles], -1) if table == "half" else angles.repeat_interleave(2, dim=-1)
        return emb.cos(), emb.sin()
    return rope_cos_sin


def rope_table_interleaved(ns):
    return ns["rotate_half"], _rope_cos_sin(table="interleaved"), ns["apply_rope"]  # BUG: each angle twice in a row


def rope_ignores_position_ids(ns):
    return ns["rotate_half"], _rope_cos_sin(use_positions=False), ns["apply_rope"]  # BUG


def rope_wrong_exponent(ns):
    # BUG: theta_i = base^(-i/head_dim)
    return ns["rotate_half"], _rope_cos_sin(lambda d, base: base ** (-torch.arange(d // 2).float() / d)), ns["apply_rope"]


def rope_positions_in_bfloat16(ns):
    # BUG: positions cast to bfloat16, which cannot represent every integer above 256
    return ns["rotate_half"], _rope_cos_sin(positions_dtype=torch.bfloat16), ns["apply_rope"]


def apply_rope_cos_sin_swapped(ns):
    return ns["rotate_half"], ns["rope_cos_sin"], lambda x, cos, sin: x * sin + ns["rotate_half"](x) * cos  # BUG


def _properties(bug):
    """The same bug, for the properties check, which takes (rope_cos_sin, apply_rope)."""
    def factory(ns):
        return bug(ns)[1:]
    factory.__name__ = bug.__name__
    return factory


# ---------------------------------------------------------------- attention
def _attention_class(ns, rope_on="qk", alibi_sign=-1.0, causal=True, rope_before_split=False, alibi_bias=None):
    rope_cos_sin, apply_rope, alibi_bias = ns["rope_cos_sin"], ns["apply_rope"], alibi_bias or ns["alibi_bias"]

    class Attention(ns["CausalSelfAttention"]):
        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if self.pos == "rope" and rope_before_split:  # BUG variant: rotates d_model-wide vectors
                cos, sin = rope_cos_sin(T, C, self.rope_base)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k, v = (t.view(B, T, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v))
            if self.pos == "rope" and not rope_before_split:
                cos, sin = rope_cos_sin(T, self.d_head, self.rope_base, scaling=self.rope_scaling)
                q, k, v = (apply_rope(t, cos, sin) if n in rope_on else t for n, t in zip("qkv", (q, k, v)))
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
            if self.pos == "alibi":
                scores = scores - alibi_sign * alibi_bias(self.n_heads, T, T)
            if causal:
                scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            return self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))
    return Attention


def attention_rope_on_v(ns):
    return _attention_class(ns, rope_on="qkv")  # BUG: the values are rotated too


def attention_no_rope(ns):
    return _attention_class(ns, rope_on="")  # BUG: pos="rope" does nothing


def attention_rope_before_head_split(ns):
    return _attention_class(ns, rope_before_split=True)  # BUG: one rotation over d_model, not per head


def attention_not_causal(ns):
    return _attention_class(ns, causal=False)  # BUG: no causal mask


def attention_alibi_sign_flipped(ns):
    return _attention_class(ns, alibi_sign=1.0)  # BUG: adds +m (i - j)


def attention_alibi_slopes_12_as_if_16(ns):
    return _attention_class(ns, alibi_bias=_alibi_bias(slopes_12_as_if_16(ns)))  # BUG: in the slopes, through alibi_bias


def attention_alibi_slopes_naive(ns):
    return _attention_class(ns, alibi_bias=_alibi_bias(slopes_naive_geometric(ns)))  # BUG: in the slopes


def attention_calls_sdpa(ns):
    class Attention(ns["CausalSelfAttention"]):
        def forward(self, x):  # BUG: PyTorch's fused attention instead of your own
            B, T, C = x.shape
            q, k, v = (p(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
            if self.pos == "rope":
                cos, sin = ns["rope_cos_sin"](T, self.d_head, self.rope_base, scaling=self.rope_scaling)
                q, k = ns["apply_rope"](q, cos, sin), ns["apply_rope"](k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, C))
    return Attention


def attention_hides_sdpa(ns):
    class Attention(ns["CausalSelfAttention"]):
        def forward(self, x):  # BUG: tries PyTorch's fused attention, and falls back to its own code when that fails
            try:
                q = x.unsqueeze(1)
                return self.o_proj(F.scaled_dot_product_attention(q, q, q, is_causal=True)[:, 0])
            except Exception:
                return super().forward(x)
    return Attention


def attention_wraps_nn_multihead(ns):
    class Attention(ns["CausalSelfAttention"]):
        def forward(self, x):  # BUG: with pos=None, PyTorch's module with copied weights
            if self.pos is not None:
                return super().forward(x)
            T, C = x.shape[1:]
            m = nn.MultiheadAttention(C, self.n_heads, bias=False, batch_first=True)
            with torch.no_grad():
                m.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
                m.out_proj.weight.copy_(self.o_proj.weight)
            return m(x, x, x, attn_mask=~torch.ones(T, T, dtype=torch.bool).tril(), need_weights=False)[0]
    return Attention


# ---------------------------------------------------------------- ALiBi
def _geometric(n):
    return [2 ** (-8 * (h + 1) / n) for h in range(n)]


def slopes_12_as_if_16(ns):
    # BUG: rounds the head count up to a power of two and keeps the first n slopes
    return lambda n_heads: torch.tensor(_geometric(2 ** math.ceil(math.log2(n_heads)))[:n_heads])


def slopes_naive_geometric(ns):
    return lambda n_heads: torch.tensor(_geometric(n_heads))  # BUG: 2^(-8(h+1)/n) for every n


def slopes_start_at_one(ns):
    return lambda n_heads: torch.tensor([2 ** (-8 * h / n_heads) for h in range(n_heads)])  # BUG: starts at 2^0


def _alibi_bias(slopes, sign=-1.0, queries_at_end=True):
    def alibi_bias(n_heads, T_q, T_k):
        start = T_k - T_q if queries_at_end else 0
        i, j = torch.arange(start, start + T_q)[:, None], torch.arange(T_k)[None, :]
        return sign * slopes(n_heads)[:, None, None] * (i - j)
    return alibi_bias


def alibi_bias_sign_flipped(ns):
    return _alibi_bias(ns["alibi_slopes"], sign=1.0)  # BUG: a reward for distance


def alibi_bias_queries_at_start(ns):
    return _alibi_bias(ns["alibi_slopes"], queries_at_end=False)  # BUG: query i at position i, not T_k - T_q + i


def alibi_bias_without_slopes(ns):
    return _alibi_bias(lambda n: torch.ones(n))  # BUG: every head with slope 1


# ---------------------------------------------------------------- RoPE scaling
def _scaled(ns, linear=None, ntk=None):
    rope_frequencies = ns["rope_frequencies"]

    def scaled(head_dim, base, scaling):
        s = scaling["factor"]
        if scaling["type"] == "linear":
            return linear(rope_frequencies, head_dim, base, s)
        return ntk(rope_frequencies, head_dim, base, s)

    def rope_cos_sin(T, head_dim, base=10000.0, position_ids=None, scaling=None):
        theta = rope_frequencies(head_dim, base) if scaling is None else scaled(head_dim, base, scaling)
        position_ids = torch.arange(T) if position_ids is None else position_ids
        angles = position_ids.float()[:, None] * theta
        emb = torch.cat([angles, angles], -1)
        return emb.cos(), emb.sin()
    return rope_cos_sin


def _pi(f, d, base, s):
    return f(d, base) / s


def _ntk(f, d, base, s):
    return f(d, base * s ** (d / (d - 2)))


def pi_multiplies_positions(ns):
    return _scaled(ns, linear=lambda f, d, base, s: f(d, base) * s, ntk=_ntk)  # BUG: stretches instead of squeezing


def ntk_base_times_s(ns):
    return _scaled(ns, linear=_pi, ntk=lambda f, d, base, s: f(d, base * s))  # BUG: base * s, no exponent


def ntk_inverse_exponent(ns):
    return _scaled(ns, linear=_pi, ntk=lambda f, d, base, s: f(d, base * s ** ((d - 2) / d)))  # BUG


def ntk_as_interpolation(ns):
    return _scaled(ns, linear=_pi, ntk=_pi)  # BUG: NTK implemented as PI


BUGS = {
    "03.sinusoidal": [
        (sinusoid_sin_cos_swapped, "sin and cos are swapped"),
        (sinusoid_concatenated, "interleaves"),
        (sinusoid_exponent_i_over_d, r"PE\[pos, 2i\] = sin\(pos / base\^\(2i/d\)\)"),
        (sinusoid_cos_without_position, "is not a linear function of PE"),
        (sinusoid_ignores_base, r"sinusoidal_encoding\(40, \d+, base=100\)"),
    ],
    "03.rope": [
        (rope_pairs_with_half_table, r"rotates the pairs \(2i, 2i\+1\).*rotate-half"),
        (rope_interleaved_layout, r"apply_rope\(x, cos, sin\) \(vs transformers' apply_rotary_pos_emb\)"),
        (rotate_half_no_minus, r"rotate_half on x .*cat\(-x2, x1\)"),
        (rope_table_interleaved, "repeats each angle twice in a row"),
        (rope_ignores_position_ids, "use the position_ids given"),
        (rope_wrong_exponent, r"\(cos, sin\) \(vs transformers' LlamaRotaryEmbedding\)"),
        (rope_positions_in_bfloat16, "the positions were rounded: bfloat16"),
        (apply_rope_cos_sin_swapped, r"apply_rope\(x, cos, sin\)"),
    ],
    "03.rope_properties": [
        (_properties(rope_pairs_with_half_table), "norms .*a rotation preserves lengths"),
        (_properties(rotate_half_no_minus), "norms"),
        (_properties(rope_positions_in_bfloat16), r"RoPE scores may depend only on m - n"),
        (_properties(apply_rope_cos_sin_swapped), "interleaved rotation"),
        (_properties(rope_interleaved_layout), "interleaved rotation"),
    ],
    "03.rope_attention": [
        (attention_rope_on_v, "RoPE was applied to the values too"),
        (attention_no_rope, "no rotation at all"),
        (attention_rope_before_head_split, "LlamaAttention"),
        (attention_not_causal, "no causal mask"),
        (attention_calls_sdpa, r"your code calls F.scaled_dot_product_attention"),
    ],
    "03.alibi_slopes": [
        (slopes_12_as_if_16, r"alibi_slopes\(12\).*first 12 slopes of 16 heads"),
        (slopes_naive_geometric, r"alibi_slopes\(12\).*powers of two only"),
        (slopes_start_at_one, r"alibi_slopes\(8\) \(vs the ALiBi paper, hand-computed\)"),
    ],
    "03.alibi_bias": [
        (alibi_bias_sign_flipped, "the sign is flipped"),
        (alibi_bias_queries_at_start, "LAST T_q positions"),
        (alibi_bias_without_slopes, r"alibi_bias\(4, 6, 6\)"),
    ],
    "03.alibi_attention": [
        (attention_alibi_sign_flipped, "the bias has the wrong sign"),
        (attention_not_causal, r"pos=None\) \(vs F.scaled_dot_product_attention, causal\)"),
        (attention_alibi_slopes_12_as_if_16, r"CausalSelfAttention\(48, 12, pos=.alibi.\).*first 12 slopes of 16 heads"),
        (attention_alibi_slopes_naive, r"CausalSelfAttention\(48, 12, pos=.alibi.\).*powers of two only"),
        (attention_hides_sdpa, r"your code calls F.scaled_dot_product_attention"),
        (attention_wraps_nn_multihead, r"your code calls nn.MultiheadAttention"),
    ],
    "03.rope_scaling": [
        (pi_multiplies_positions, "position interpolation divides every position by the factor"),
        (ntk_base_times_s, r"base' = base \* s\^\(d / \(d - 2\)\)"),
        (ntk_inverse_exponent, r"'ntk'.*base' = base \* s\^\(d / \(d - 2\)\)"),
        (ntk_as_interpolation, r"'ntk'"),
    ],
}
