"""Seeded factories for the inputs of checks: generators, weights in the labs' layouts, masks.

Every check draws its inputs from :func:`seeded_generator`, so that the same seed gives the same
inputs everywhere; the notebook uses seed 0 and the grader draws its own. Weight factories name
the parameters as the labs' modules do (``q_proj.weight``, ``fc1.bias``, ``gate_proj.weight``...),
scaled like PyTorch's default initialisation, with biases and norm gains away from 0 and 1 so
that a forgotten bias or gain shows.
"""

import math

import torch


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for a check's inputs: the same seed draws the same inputs everywhere."""
    return torch.Generator().manual_seed(seed)


def _name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def linear_weights(prefix: str, d_in: int, d_out: int, g: torch.Generator, bias: bool = True) -> dict:
    """Random weights for an ``nn.Linear(d_in, d_out)`` named ``prefix``, scaled like its default init."""
    return ({f"{prefix}.weight": torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)}
            | ({f"{prefix}.bias": 0.1 * torch.randn(d_out, generator=g)} if bias else {}))


def norm_weights(prefix: str, d: int, g: torch.Generator, bias: bool = True) -> dict:
    """A norm's gain near 1 (and bias near 0), named ``prefix.weight`` (and ``prefix.bias``)."""
    return ({_name(prefix, "weight"): 1 + 0.1 * torch.randn(d, generator=g)}
            | ({_name(prefix, "bias"): 0.1 * torch.randn(d, generator=g)} if bias else {}))


def attention_weights(prefix: str, d_model: int, g: torch.Generator, n_heads: int = 1, n_kv_heads: int | None = None,
                      bias: bool = True, out: str = "out_proj") -> dict:
    """``q_proj``, ``k_proj``, ``v_proj`` and the output projection ``out`` (``out_proj`` as in Lab 1a
    and ``nn.MultiheadAttention``, or ``o_proj`` as in Llama), with ``n_kv_heads`` key-value heads of
    ``d_model // n_heads`` dimensions each (all heads when None)."""
    d_kv = (n_kv_heads or n_heads) * (d_model // n_heads)
    return (linear_weights(_name(prefix, "q_proj"), d_model, d_model, g, bias)
            | linear_weights(_name(prefix, "k_proj"), d_model, d_kv, g, bias)
            | linear_weights(_name(prefix, "v_proj"), d_model, d_kv, g, bias)
            | linear_weights(_name(prefix, out), d_model, d_model, g, bias))


def mlp_weights(prefix: str, d_model: int, d_ff: int, g: torch.Generator, gated: bool = False) -> dict:
    """An FFN: ``fc1``, ``fc2`` with biases or, ``gated``, Llama's ``gate_proj``, ``up_proj``, ``down_proj`` without."""
    if gated:
        return (linear_weights(_name(prefix, "gate_proj"), d_model, d_ff, g, bias=False)
                | linear_weights(_name(prefix, "up_proj"), d_model, d_ff, g, bias=False)
                | linear_weights(_name(prefix, "down_proj"), d_ff, d_model, g, bias=False))
    return (linear_weights(_name(prefix, "fc1"), d_model, d_ff, g)
            | linear_weights(_name(prefix, "fc2"), d_ff, d_model, g))


def mla_weights(c: dict, g: torch.Generator) -> dict:
    """DeepSeek-V2/V3 attention's weights for Lab 2's configuration ``c`` (the names of DeepseekV3Attention)."""
    d, q, kv, H = c["d_model"], c["q_lora_rank"], c["kv_lora_rank"], c["n_heads"]
    n, r, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    shapes = {"q_a_proj": (d, q), "q_b_proj": (q, H * (n + r)), "kv_a_proj_with_mqa": (d, kv + r),
              "kv_b_proj": (kv, H * (n + dv)), "o_proj": (H * dv, d)}
    return ({k: w for name, shape in shapes.items() for k, w in linear_weights(name, *shape, g, bias=False).items()}
            | norm_weights("q_a_layernorm", q, g, bias=False) | norm_weights("kv_a_layernorm", kv, g, bias=False))


def causal(T_q: int, T_k: int | None = None) -> torch.Tensor:
    """(T_q, T_k) bool, True where query i may attend to key j: the queries are the last T_q of the
    T_k positions (as when decoding with a cache), so j <= i + (T_k - T_q)."""
    T_k = T_q if T_k is None else T_k
    return torch.ones(T_q, T_k, dtype=torch.bool).tril(T_k - T_q)


def additive(mask: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A boolean mask (True = may attend) as the additive float mask of Hugging Face's attention
    modules: 0 where allowed, -inf elsewhere, with leading (1, 1) batch and head axes."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))[None, None]


def doubled(weights: dict) -> dict:
    """The same state dict in float64 (references compute in float64)."""
    return {k: v.double() for k, v in weights.items()}
