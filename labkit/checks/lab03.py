"""Checks of Lab 3: position encodings and length extrapolation.

References, never the course's own solution:

- the 2017 paper's closed form for the sinusoidal encoding, and the fact that ``PE[p + k]`` is a
  fixed rotation of ``PE[p]``;
- Hugging Face's Llama (``LlamaRotaryEmbedding``, ``rotate_half``, ``apply_rotary_pos_emb``,
  ``LlamaAttention``), built offline from a small ``LlamaConfig`` with random weights; its
  "linear" and "dynamic" RoPE scalings for position interpolation and NTK-aware scaling;
- the rotation of complex pairs of the RoFormer paper (the interleaved layout), and RoPE's
  relative property and norm preservation;
- the ALiBi paper's slopes (hand-computed for 8 and 12 heads; its released rule otherwise), and
  ``F.scaled_dot_product_attention`` with the linear bias as a float mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from labkit.checks import Check, assert_close, load_weights, seeded_generator


def _tensor(what: str, value, shape: tuple) -> torch.Tensor:
    """``value`` as a float64 tensor of ``shape``, or an AssertionError saying what came back."""
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise AssertionError(f"{what}: shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value.detach().double()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.shape == b.shape and bool(((a.double() - b.double()).abs() <= atol).all())


# ---------------------------------------------------------------- Hugging Face references
def _llama_config(d_model: int, n_heads: int, base: float, rope_type: str = "default", factor: float = 1.0,
                  max_position_embeddings: int = 4096):
    """A small ``LlamaConfig`` (random weights are drawn elsewhere; nothing is downloaded).

    transformers 5 names the RoPE settings ``rope_parameters``; transformers 4 used ``rope_theta``
    and ``rope_scaling``. Both are supported so that the check also runs in Colab's version.
    """
    from transformers import LlamaConfig

    sizes = dict(hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                 head_dim=d_model // n_heads, intermediate_size=2 * d_model, num_hidden_layers=1, vocab_size=8,
                 max_position_embeddings=max_position_embeddings, attention_bias=False,
                 attn_implementation="eager")
    rope = {"rope_type": rope_type} | ({} if rope_type == "default" else {"factor": factor})
    if hasattr(LlamaConfig(), "rope_parameters"):  # transformers >= 5
        return LlamaConfig(**sizes, rope_parameters=rope | {"rope_theta": base})
    return LlamaConfig(**sizes, rope_theta=base, rope_scaling=None if rope_type == "default" else rope)


def hf_cos_sin(head_dim: int, base: float, position_ids: torch.Tensor, rope_type: str = "default",
               factor: float = 1.0, max_position_embeddings: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's cos and sin tables, (T, head_dim), from ``LlamaRotaryEmbedding``."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _llama_config(head_dim, 1, base, rope_type, factor, max_position_embeddings)
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), position_ids.long()[None])
    return cos[0].double(), sin[0].double()


def hf_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's ``apply_rotary_pos_emb`` on x: (B, H, T, d) with cos, sin: (T, d)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out, _ = apply_rotary_pos_emb(x, x, cos[None], sin[None])
    return out


def hf_llama_attention(weights: dict, x: torch.Tensor, n_heads: int, base: float, rope_type: str = "default",
                       factor: float = 1.0) -> torch.Tensor:
    """The output of ``LlamaAttention`` (eager, causal) with the given projection weights."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    B, T, d_model = x.shape
    config = _llama_config(d_model, n_heads, base, rope_type, factor)
    attention = LlamaAttention(config, layer_idx=0).double().eval()
    attention.load_state_dict({k: v.double() for k, v in weights.items()})
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(T)[None])
    causal = torch.full((T, T), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        out, _ = attention(x.double(), position_embeddings=(cos.double(), sin.double()), attention_mask=causal)
    return out


# ---------------------------------------------------------------- closed forms used by verify
def sinusoid_table(T: int, d: int, base: float, layout: str = "interleaved") -> torch.Tensor:
    """PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(...), in float64 (other layouts for hints)."""
    p = torch.arange(T, dtype=torch.float64)[:, None]
    i = torch.arange(0, d, 2, dtype=torch.float64)
    angle = p / base ** (i / d)  # (T, d/2)
    sin, cos = angle.sin(), angle.cos()
    if layout == "concatenated":
        return torch.cat([sin, cos], dim=-1)
    first, second = (cos, sin) if layout == "swapped" else (sin, cos)
    return torch.stack([first, second], dim=-1).flatten(-2)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """(T, head_dim/2) angles p * base^(-2i/head_dim), in float64."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return positions.double()[:, None] * theta[None, :]


def rotate_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The RoFormer form: pairs (x_2i, x_2i+1) as complex numbers, times e^(i * angle)."""
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def paper_alibi_slopes(n: int) -> list[float]:
    """The slopes of the ALiBi paper's released code (Press et al., 2022), for any number of heads."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-2 ** -(math.log2(n) - 3))  # 2^(-8/n)
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_alibi_slopes(2 * closest)[0::2][:n - closest]


# Hand-computed from the paper's rule (Section 3): for 8 heads the geometric sequence 2^-1 ... 2^-8;
# for 12 heads, those 8 slopes followed by every other slope of 16 heads (2^-0.5, 2^-1, ..., 2^-8),
# starting with the first: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
SLOPES_8 = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
SLOPES_12 = SLOPES_8 + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]


def alibi_reference(slopes: list[float], T_q: int, T_k: int) -> torch.Tensor:
    """(H, T_q, T_k): -m_h * (i - j), the queries being the last T_q of T_k positions."""
    i = torch.arange(T_k - T_q, T_k, dtype=torch.float64)[:, None]
    j = torch.arange(T_k, dtype=torch.float64)[None, :]
    return -torch.tensor(slopes, dtype=torch.float64)[:, None, None] * (i - j)


def _causal_part(T_q: int, T_k: int) -> torch.Tensor:
    """(T_q, T_k) bool: the entries a causal mask keeps, j <= i, with queries at the end."""
    return torch.ones(T_q, T_k, dtype=torch.bool).tril(T_k - T_q)


# ---------------------------------------------------------------- 03.sinusoidal
def sinusoidal_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d = [8, 12, 16][int(torch.randint(3, (1,), generator=g))]
    return {"cases": [(50, 16, 10000.0), (40, d, 100.0)], "shift": 3 + int(torch.randint(5, (1,), generator=g)),
            "points": [(0, 0), (1, 0), (1, 1), (7, 4), (33, 9), (49, 15)]}


def sinusoidal_collect(inputs: dict, sinusoidal_encoding) -> dict:
    return {f"pe{n}": sinusoidal_encoding(T, d, base) for n, (T, d, base) in enumerate(inputs["cases"])}


def sinusoidal_verify(inputs: dict, out: dict) -> str:
    for n, (T, d, base) in enumerate(inputs["cases"]):
        what = f"sinusoidal_encoding({T}, {d}, base={base:g})"
        pe = _tensor(what, out[f"pe{n}"], (T, d))
        # PE[p + k] must be a linear function of PE[p]: fit the map by least squares and look at the residual.
        k = inputs["shift"]
        M = torch.linalg.lstsq(pe[:-k], pe[k:]).solution  # (d, d)
        residual = (pe[:-k] @ M - pe[k:]).abs().max().item()
        if residual > 1e-3:
            raise AssertionError(f"{what}: PE[pos + {k}] is not a linear function of PE[pos] (least-squares residual "
                                 f"{residual:.3g}); each pair of dimensions must be (sin, cos) of the same angle pos * w_i")
        want = sinusoid_table(T, d, base)
        if n == 0:  # the closed form at chosen points, written out
            for p, dim in inputs["points"]:
                angle = p / base ** (2 * (dim // 2) / d)
                value = math.sin(angle) if dim % 2 == 0 else math.cos(angle)
                if abs(pe[p, dim].item() - value) > 1e-4:
                    hint = {"swapped": "sin and cos are swapped: sin goes to the even dimensions 2i, cos to the odd 2i+1",
                            "concatenated": "the 2017 paper interleaves: PE[:, 0::2] = sin, PE[:, 1::2] = cos, "
                                            "not all sines then all cosines"}
                    guess = next((h for layout, h in hint.items() if _close(pe, sinusoid_table(T, d, base, layout), 1e-4)),
                                 "PE[pos, 2i] = sin(pos / base^(2i/d)) and PE[pos, 2i+1] = cos(pos / base^(2i/d))")
                    raise AssertionError(f"{what}: PE[{p}, {dim}] = {pe[p, dim].item():.5g}, the closed form gives "
                                         f"{value:.5g}. {guess}")
        assert_close(what, pe, want, atol=1e-4,
                     hint="PE[pos, 2i] = sin(pos / base^(2i/d)), PE[pos, 2i+1] = cos(pos / base^(2i/d)); use the base given")
    return "✔ 03.sinusoidal: matches the closed form, and PE[pos + k] is a fixed linear map (a rotation) of PE[pos]"


# ---------------------------------------------------------------- 03.rope: the tables and apply_rope against HF Llama
def rope_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    head_dim, T = [8, 16][int(torch.randint(2, (1,), generator=g))], 12
    positions = torch.cat([torch.tensor([0, 1, 7, 100, 1000, 4095]), torch.randint(4096, (T - 6,), generator=g)])
    base = [10000.0, 500000.0][int(torch.randint(2, (1,), generator=g))]
    angles = rope_angles(torch.arange(T), head_dim, base)
    emb = torch.cat([angles, angles], dim=-1)  # the rotate-half layout, cat(freqs, freqs)
    return {"T": T, "head_dim": head_dim, "base": base, "positions": positions,
            "cos": emb.cos().float(), "sin": emb.sin().float(), "x": torch.randn(2, 3, T, head_dim, generator=g)}


def rope_collect(inputs: dict, rotate_half, rope_cos_sin, apply_rope) -> dict:
    T, head_dim, base = inputs["T"], inputs["head_dim"], inputs["base"]
    cos, sin = rope_cos_sin(T, head_dim, base)
    cos_p, sin_p = rope_cos_sin(T, head_dim, base, position_ids=inputs["positions"])
    return {"rotate_half": rotate_half(inputs["x"]), "cos": cos, "sin": sin, "cos_p": cos_p, "sin_p": sin_p,
            "rotated": apply_rope(inputs["x"], inputs["cos"], inputs["sin"])}


def rope_verify(inputs: dict, out: dict) -> str:
    from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half

    T, head_dim, base, x = inputs["T"], inputs["head_dim"], inputs["base"], inputs["x"].double()
    assert_close(f"rotate_half on x of shape {tuple(x.shape)} (vs transformers' Llama rotate_half)",
                 out["rotate_half"], hf_rotate_half(x),
                 hint="split the last axis into halves x1, x2 and return cat(-x2, x1)")
    for name, positions in (("", torch.arange(T)), ("_p", inputs["positions"])):
        want_cos, want_sin = hf_cos_sin(head_dim, base, positions)
        case = "position_ids=None" if not name else f"position_ids={inputs['positions'].tolist()}"
        what = f"rope_cos_sin({T}, {head_dim}, base={base:g}, {case})"
        cos, sin = _tensor(f"{what}[0] (cos)", out["cos" + name], (T, head_dim)), \
            _tensor(f"{what}[1] (sin)", out["sin" + name], (T, head_dim))
        half = rope_angles(positions, head_dim, base)
        if _close(cos, torch.stack([half, half], -1).flatten(-2).cos(), 1e-4):
            raise AssertionError(f"{what}: the table repeats each angle twice in a row (interleaved layout); "
                                 "Llama's rotate-half layout is cat(freqs, freqs): angle i at columns i and i + d/2")
        hint = "angles = position * base^(-2i/head_dim) for i < head_dim/2; table = cat(angles, angles)"
        rounded = rope_angles(positions.to(torch.bfloat16).double(), head_dim, base)
        if name and _close(cos, torch.cat([rounded, rounded], -1).cos(), 1e-3):
            hint = ("the positions were rounded: bfloat16 (and float16) cannot represent every integer above 256 "
                    "(2048); compute the angles in float32")
        elif name:
            hint += "; use the position_ids given, not arange(T)"
        # float32 angles p * theta_i carry a rounding error of order p * 1e-7 rad: 1e-3 allows p up to ~4000
        assert_close(f"{what}: cos (vs transformers' LlamaRotaryEmbedding)", cos, want_cos, atol=1e-3, hint=hint)
        assert_close(f"{what}: sin (vs transformers' LlamaRotaryEmbedding)", sin, want_sin, atol=1e-3, hint=hint)
    want = hf_apply_rope(x, inputs["cos"].double(), inputs["sin"].double())
    rotated = _tensor(f"apply_rope(x of shape {tuple(x.shape)}, cos, sin)", out["rotated"], x.shape)
    hint = "apply_rope(x) = x * cos + rotate_half(x) * sin, with cos and sin broadcast over batch and heads"
    pairs = rotated.clone()  # what pairing (2i, 2i+1) with the rotate-half table gives
    c, s = inputs["cos"].double(), inputs["sin"].double()
    pairs[..., 0::2] = x[..., 0::2] * c[..., 0::2] - x[..., 1::2] * s[..., 0::2]
    pairs[..., 1::2] = x[..., 1::2] * c[..., 1::2] + x[..., 0::2] * s[..., 1::2]
    if _close(rotated, pairs, 1e-4):
        hint = ("this rotates the pairs (2i, 2i+1), the interleaved layout, but the table is in the rotate-half "
                "layout, where dimension i pairs with i + d/2: use x * cos + rotate_half(x) * sin")
    assert_close("apply_rope(x, cos, sin) (vs transformers' apply_rotary_pos_emb)", rotated, want, atol=1e-5, hint=hint)
    return "✔ 03.rope: rotate_half, the cos/sin tables and apply_rope match Hugging Face's Llama"


# ---------------------------------------------------------------- 03.rope_properties
def rope_properties_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    head_dim, T = 16, 10
    return {"head_dim": head_dim, "T": T, "base": 100.0, "shifts": [0, 1, 13, 250 + int(torch.randint(50, (1,), generator=g))],
            "q": torch.randn(head_dim, generator=g), "k": torch.randn(head_dim, generator=g),
            "x": torch.randn(2, 3, T, head_dim, generator=g)}


def rope_properties_collect(inputs: dict, rope_cos_sin, apply_rope) -> dict:
    T, head_dim, base = inputs["T"], inputs["head_dim"], inputs["base"]
    q, k = inputs["q"].expand(1, 1, T, head_dim), inputs["k"].expand(1, 1, T, head_dim)
    out = {}
    for s in inputs["shifts"]:  # the same q at every position m + s, the same k at every n + s
        cos, sin = rope_cos_sin(T, head_dim, base, position_ids=torch.arange(T) + s)
        out[f"scores{s}"] = apply_rope(q, cos, sin)[0, 0] @ apply_rope(k, cos, sin)[0, 0].T  # (T, T)
    cos, sin = rope_cos_sin(T, head_dim, base)
    out["rotated"] = apply_rope(inputs["x"], cos, sin)
    half_layout = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])  # x_0, x_2, ..., x_1, x_3, ...
    out["permuted"] = apply_rope(inputs["x"][..., half_layout], cos, sin)
    return out


def rope_properties_verify(inputs: dict, out: dict) -> str:
    T, head_dim, base = inputs["T"], inputs["head_dim"], inputs["base"]
    x = inputs["x"].double()
    rotated = _tensor("apply_rope(x, *rope_cos_sin(T, head_dim))", out["rotated"], x.shape)
    norms, want_norms = rotated.norm(dim=-1), x.norm(dim=-1)
    assert_close("norms |apply_rope(x)| against |x| (a rotation preserves lengths)", norms, want_norms, atol=1e-4,
                 hint="each pair (x_i, x_{i+d/2}) must be rotated by the same angle: cos and sin of one table row")
    base_scores = _tensor("scores <R_m q, R_n k>", out[f"scores{inputs['shifts'][0]}"], (T, T))
    for s in inputs["shifts"][1:]:
        shifted = _tensor(f"scores at positions shifted by {s}", out[f"scores{s}"], (T, T))
        assert_close(f"<R_(m+{s}) q, R_(n+{s}) k> against <R_m q, R_n k> (RoPE scores may depend only on m - n)",
                     shifted, base_scores, atol=1e-3,
                     hint="rotate q and k with the cos and sin of their own positions (position_ids)")
    # The interleaved form of the RoFormer paper is the same function after a permutation of the head dimensions.
    permuted = _tensor("apply_rope on x with dimensions permuted to (0, 2, 4, ..., 1, 3, 5, ...)", out["permuted"], x.shape)
    back = torch.empty_like(permuted)
    back[..., 0::2], back[..., 1::2] = permuted[..., :head_dim // 2], permuted[..., head_dim // 2:]
    want = rotate_interleaved(x, rope_angles(torch.arange(T), head_dim, base))
    assert_close("apply_rope in the rotate-half layout, permuted back, against the paper's interleaved rotation of "
                 "pairs (x_2i, x_2i+1) by angle m * theta_i", back, want, atol=1e-4,
                 hint="dimension i of the rotate-half layout must pair with dimension i + d/2, both with angle m * theta_i")
    return ("✔ 03.rope_properties: scores depend only on m - n, norms are preserved, and it equals the interleaved "
            "rotation after permuting the head dimensions")


# ---------------------------------------------------------------- attention with RoPE and with ALiBi
def _attention_weights(d_model: int, g: torch.Generator) -> dict:
    return {f"{n}_proj.weight": torch.randn(d_model, d_model, generator=g) / math.sqrt(d_model) for n in "qkvo"}


def rope_attention_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model, n_heads = 32, 4
    return {"d_model": d_model, "n_heads": n_heads, "base": [10000.0, 100.0][seed % 2],
            "weights": _attention_weights(d_model, g), "x": torch.randn(2, 10, d_model, generator=g)}


def rope_attention_collect(inputs: dict, CausalSelfAttention) -> dict:
    attention = CausalSelfAttention(inputs["d_model"], inputs["n_heads"], pos="rope", rope_base=inputs["base"])
    load_weights(attention, inputs["weights"], "CausalSelfAttention")
    with torch.no_grad():
        return {"out": attention(inputs["x"])}


def _manual_attention(w: dict, x: torch.Tensor, n_heads: int, base: float, rope_on: str,
                      causal: bool = True) -> torch.Tensor:
    """Attention with RoPE applied to the named tensors (for hints only; the reference is LlamaAttention)."""
    B, T, C = x.shape
    q, k, v = ((x @ w[f"{n}_proj.weight"].double().T).view(B, T, n_heads, -1).transpose(1, 2) for n in "qkv")
    angles = rope_angles(torch.arange(T), C // n_heads, base)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rot = lambda t: t * cos + torch.cat([-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]], -1) * sin
    q, k, v = (rot(t) if n in rope_on else t for n, t in zip("qkv", (q, k, v)))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(B, T, C) @ w["o_proj.weight"].double().T


def rope_attention_verify(inputs: dict, out: dict) -> str:
    x, w, n_heads, base = inputs["x"].double(), inputs["weights"], inputs["n_heads"], inputs["base"]
    got = _tensor("CausalSelfAttention(pos='rope')(x)", out["out"], x.shape)
    want = hf_llama_attention(w, x, n_heads, base)
    hint = "split heads, then rotate q and k (never v) with rope_cos_sin(T, d_head, rope_base), causal softmax, o_proj"
    if _close(got, _manual_attention(w, x, n_heads, base, "qkv"), 1e-5):
        hint = "RoPE was applied to the values too: rotate only q and k, which meet in the scores; v carries content"
    elif _close(got, _manual_attention(w, x, n_heads, base, ""), 1e-5):
        hint = "no rotation at all: with pos='rope', apply RoPE to q and k after splitting the heads"
    elif _close(got, _manual_attention(w, x, n_heads, base, "qk", causal=False), 1e-5):
        hint = "no causal mask: query i must not attend to keys j > i"
    assert_close(f"CausalSelfAttention(pos='rope', rope_base={base:g}) against transformers' LlamaAttention "
                 "with the same weights", got, want, atol=1e-5, hint=hint)
    return "✔ 03.rope_attention: with pos='rope' the attention equals Hugging Face's LlamaAttention, weight for weight"


def alibi_attention_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d_model, n_heads = 48, 12 if seed % 2 == 0 else 8
    return {"d_model": d_model, "n_heads": n_heads, "weights": _attention_weights(d_model, g),
            "x": 2 * torch.randn(2, 20, d_model, generator=g)}


def alibi_attention_collect(inputs: dict, CausalSelfAttention) -> dict:
    out = {}
    for pos in ("alibi", None):
        attention = CausalSelfAttention(inputs["d_model"], inputs["n_heads"], pos=pos)
        load_weights(attention, inputs["weights"], "CausalSelfAttention")
        with torch.no_grad():
            out[str(pos)] = attention(inputs["x"])
    return out


def alibi_attention_verify(inputs: dict, out: dict) -> str:
    x, w, H = inputs["x"].double(), {k: v.double() for k, v in inputs["weights"].items()}, inputs["n_heads"]
    B, T, C = x.shape
    q, k, v = ((x @ w[f"{n}_proj.weight"].T).view(B, T, H, -1).transpose(1, 2) for n in "qkv")
    merge = lambda o: o.transpose(1, 2).reshape(B, T, C) @ w["o_proj.weight"].T
    plain = merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert_close("CausalSelfAttention(pos=None) (vs F.scaled_dot_product_attention, causal)",
                 _tensor("CausalSelfAttention(pos=None)(x)", out["None"], x.shape), plain, atol=1e-5,
                 hint="scores q k^T / sqrt(d_head), causal mask, softmax over the keys, then o_proj")
    bias = alibi_reference(paper_alibi_slopes(H), T, T)
    mask = bias.masked_fill(~_causal_part(T, T), float("-inf"))
    want = merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    got = _tensor("CausalSelfAttention(pos='alibi')(x)", out["alibi"], x.shape)
    hint = "add alibi_bias(H, T, T) to the scaled scores q k^T / sqrt(d_head) before the causal mask and the softmax"
    if _close(got, merge(F.scaled_dot_product_attention(q, k, v, attn_mask=(-bias).masked_fill(~_causal_part(T, T),
                                                                                                 float("-inf")))), 1e-5):
        hint = "the bias has the wrong sign: ALiBi subtracts m_h * (i - j), a penalty growing with distance"
    assert_close(f"CausalSelfAttention(pos='alibi') with {H} heads (vs F.scaled_dot_product_attention with the "
                 "ALiBi bias as a float mask)", got, want, atol=1e-5, hint=hint)
    return "✔ 03.alibi_attention: with pos=None and pos='alibi' the attention equals F.scaled_dot_product_attention"


# ---------------------------------------------------------------- 03.alibi_slopes and 03.alibi_bias
def alibi_slopes_inputs(seed: int) -> dict:
    return {"counts": [8, 12, 1, 2, 4, 6, 16, 20]}


def alibi_slopes_collect(inputs: dict, alibi_slopes) -> dict:
    return {f"h{n}": alibi_slopes(n) for n in inputs["counts"]}


def alibi_slopes_verify(inputs: dict, out: dict) -> str:
    for n in inputs["counts"]:
        slopes = _tensor(f"alibi_slopes({n})", out[f"h{n}"], (n,))
        want = torch.tensor(SLOPES_8 if n == 8 else SLOPES_12 if n == 12 else paper_alibi_slopes(n), dtype=torch.float64)
        hint = "for n a power of two, the slopes are 2^(-8/n), 2^(-16/n), ..., 2^(-8)"
        if n == 12 and _close(slopes, torch.tensor(paper_alibi_slopes(16)[:12]), 1e-6):
            hint = ("these are the first 12 slopes of 16 heads; the paper takes the 8 slopes of 8 heads, then every "
                    "other slope of 16 heads (2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5)")
        elif not math.log2(n).is_integer() and _close(slopes, torch.tensor([2 ** (-8 * (i + 1) / n) for i in range(n)]), 1e-6):
            hint = ("2^(-8(i+1)/n) is the rule for powers of two only; for other n the paper takes the slopes of the "
                    "closest smaller power of two p, then every other slope of 2p heads")
        assert_close(f"alibi_slopes({n}) (vs the ALiBi paper" + (", hand-computed)" if n in (8, 12) else ")"),
                     slopes, want, atol=1e-6, hint=hint)
    return "✔ 03.alibi_slopes: the paper's slopes for 8 and 12 heads (hand-computed) and for 1, 2, 4, 6, 16 and 20 heads"


def alibi_bias_inputs(seed: int) -> dict:
    return {"cases": [(4, 6, 6), (8, 1, 9), (12, 3, 7)]}


def alibi_bias_collect(inputs: dict, alibi_bias) -> dict:
    return {f"case{n}": alibi_bias(*case) for n, case in enumerate(inputs["cases"])}


def alibi_bias_verify(inputs: dict, out: dict) -> str:
    for n, (H, T_q, T_k) in enumerate(inputs["cases"]):
        what = f"alibi_bias({H}, {T_q}, {T_k})"
        bias = _tensor(what, out[f"case{n}"], (H, T_q, T_k))
        want = alibi_reference(paper_alibi_slopes(H), T_q, T_k)
        keep = _causal_part(T_q, T_k).expand(H, T_q, T_k)
        got_kept, want_kept = bias[keep], want[keep]
        hint = "bias[h, i, j] = -m_h * (i - j), where query i sits at position T_k - T_q + i"
        if _close(got_kept, -want_kept, 1e-6) and T_k > 1:
            hint = ("the sign is flipped: ALiBi is a penalty, -m_h * distance, so that distant keys get lower "
                    "scores; yours rewards them")
        elif T_q < T_k and _close(bias[..., :T_q, :T_q], alibi_reference(paper_alibi_slopes(H), T_q, T_q), 1e-6):
            hint = "the queries are the LAST T_q positions (as when decoding with a cache): query i is at T_k - T_q + i"
        assert_close(f"{what} on the entries j <= i that the causal mask keeps (vs -m_h * (i - j), paper slopes)",
                     got_kept, want_kept, atol=1e-5, hint=hint)
    return "✔ 03.alibi_bias: -m_h * (i - j) with the paper's slopes, for square, single-query and rectangular shapes"


# ---------------------------------------------------------------- 03.rope_scaling
def rope_scaling_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"head_dim": [8, 16][seed % 2], "base": 10000.0, "L": 16, "factors": [2.0, 4.0],
            "positions": torch.randint(64, (10,), generator=g)}


def rope_scaling_collect(inputs: dict, rope_cos_sin) -> dict:
    head_dim, base, L, positions = inputs["head_dim"], inputs["base"], inputs["L"], inputs["positions"]
    out = {"plain": rope_cos_sin(L, head_dim, base)}
    for s in inputs["factors"]:
        stretched = (torch.arange(L) * s).long()  # positions 0, s, 2s, ...: s * L covers the extended window
        for kind in ("linear", "ntk"):
            scaling = {"type": kind, "factor": s}
            out[f"{kind}{s:g}"] = rope_cos_sin(len(positions), head_dim, base, position_ids=positions, scaling=scaling)
            out[f"{kind}{s:g}_stretched"] = rope_cos_sin(L, head_dim, base, position_ids=stretched, scaling=scaling)
        out[f"ntk{s:g}_long"] = rope_cos_sin(int(s * L), head_dim, base, scaling={"type": "ntk", "factor": s})
    out["factor1"] = rope_cos_sin(L, head_dim, base, scaling={"type": "ntk", "factor": 1.0})
    return out


def rope_scaling_verify(inputs: dict, out: dict) -> str:
    head_dim, base, L, positions = inputs["head_dim"], inputs["base"], inputs["L"], inputs["positions"]
    cos0, sin0 = (_tensor(f"rope_cos_sin({L}, {head_dim})[{i}]", t, (L, head_dim)) for i, t in enumerate(out["plain"]))
    half = head_dim // 2
    for s in inputs["factors"]:
        # Position interpolation: against transformers' "linear" RoPE, and position s * p lands on the angle of p.
        what = f"scaling={{'type': 'linear', 'factor': {s:g}}}"
        cos, sin = (_tensor(f"rope_cos_sin(..., {what})[{i}]", t, (len(positions), head_dim))
                    for i, t in enumerate(out[f"linear{s:g}"]))
        want_cos, want_sin = hf_cos_sin(head_dim, base, positions, "linear", s)
        hint = "position interpolation divides every position by the factor: angle = (p / s) * theta_i"
        assert_close(f"{what}: cos (vs transformers' 'linear' RoPE)", cos, want_cos, atol=1e-4, hint=hint)
        assert_close(f"{what}: sin (vs transformers' 'linear' RoPE)", sin, want_sin, atol=1e-4, hint=hint)
        stretched = _tensor(f"{what} at positions 0, s, 2s, ...", out[f"linear{s:g}_stretched"][0], (L, head_dim))
        assert_close(f"{what}: cos at position s * p against the unscaled cos at p (PI maps s * L onto L)",
                     stretched, cos0, atol=1e-4)
        # NTK-aware scaling: base * s^(d / (d - 2)); dims 0 and d/2 unchanged, the slowest pair interpolated by s.
        what = f"scaling={{'type': 'ntk', 'factor': {s:g}}}"
        cos, sin = (_tensor(f"rope_cos_sin(..., {what})[{i}]", t, (len(positions), head_dim))
                    for i, t in enumerate(out[f"ntk{s:g}"]))
        angles = rope_angles(positions, head_dim, base * s ** (head_dim / (head_dim - 2)))
        hint = "NTK-aware scaling keeps the positions and changes the base: base' = base * s^(d / (d - 2))"
        assert_close(f"{what}: cos (vs base' = base * s^(d/(d-2)))", cos, torch.cat([angles, angles], -1).cos(),
                     atol=1e-4, hint=hint)
        assert_close(f"{what}: sin (vs base' = base * s^(d/(d-2)))", sin, torch.cat([angles, angles], -1).sin(),
                     atol=1e-4, hint=hint)
        stretched = _tensor(f"{what} at positions 0, s, 2s, ...", out[f"ntk{s:g}_stretched"][0], (L, head_dim))
        assert_close(f"{what}: the lowest frequency (dims {half - 1} and {head_dim - 1}) at position s * p against "
                     "the unscaled one at p (NTK interpolates the slowest pair by exactly s)",
                     stretched[:, [half - 1, head_dim - 1]], cos0[:, [half - 1, head_dim - 1]], atol=1e-4, hint=hint)
        long_cos = _tensor(f"rope_cos_sin({int(s * L)}, ..., {what})[0]", out[f"ntk{s:g}_long"][0], (int(s * L), head_dim))
        assert_close(f"{what}: the highest frequency (dims 0 and {half}) against the unscaled one (NTK leaves it alone)",
                     long_cos[:L, [0, half]], cos0[:, [0, half]], atol=1e-4, hint=hint)
        # transformers' dynamic NTK with factor 1 at sequence length s * L is the static NTK-aware scaling of factor s.
        dyn_cos, _ = hf_cos_sin(head_dim, base, torch.arange(int(s * L)), "dynamic", 1.0, max_position_embeddings=L)
        assert_close(f"{what} over {int(s * L)} positions (vs transformers' dynamic NTK RoPE at length s * L)",
                     long_cos, dyn_cos, atol=1e-4, hint=hint)
    factor1 = _tensor("rope_cos_sin with scaling factor 1", out["factor1"][0], (L, head_dim))
    assert_close("scaling={'type': 'ntk', 'factor': 1} against no scaling", factor1, cos0, atol=1e-5)
    return ("✔ 03.rope_scaling: PI matches transformers' linear RoPE and maps s * p onto p; NTK-aware scaling "
            "changes the base as d/(d-2), keeps the fastest pair and interpolates the slowest by s")


CHECKS = [
    Check("03.sinusoidal", sinusoidal_inputs, sinusoidal_collect, sinusoidal_verify),
    Check("03.rope", rope_inputs, rope_collect, rope_verify),
    Check("03.rope_properties", rope_properties_inputs, rope_properties_collect, rope_properties_verify),
    Check("03.rope_attention", rope_attention_inputs, rope_attention_collect, rope_attention_verify),
    Check("03.alibi_slopes", alibi_slopes_inputs, alibi_slopes_collect, alibi_slopes_verify),
    Check("03.alibi_bias", alibi_bias_inputs, alibi_bias_collect, alibi_bias_verify),
    Check("03.alibi_attention", alibi_attention_inputs, alibi_attention_collect, alibi_attention_verify),
    Check("03.rope_scaling", rope_scaling_inputs, rope_scaling_collect, rope_scaling_verify),
]
