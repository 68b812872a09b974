"""Checks of Lab 3: position encodings, against the 2017 closed form, Hugging Face's Llama (rotate_half, RoPE tables
and scalings, apply_rotary_pos_emb, LlamaAttention), RoFormer's rotation, the ALiBi paper's slopes and SDPA."""

import torch
import torch.nn.functional as F

from labkit.checks import (ATTENTION_BUILTINS, additive, as_tensor, attention_weights, causal, compare, define,
                           doubled, references as ref, seeded_generator, table, table_inputs)
from labkit.checks.kernel import attempt, run_cases


@define("03.sinusoidal", table_inputs(lambda g: [
    {"args": [T, d, base], "shift": 3 + int(torch.randint(5, (1,), generator=g))}  # PE[p + shift] is linear in PE[p]
    for T, d, base in ((50, 16, 10000.0), (40, [8, 12, 16][int(torch.randint(3, (1,), generator=g))], 100.0))]),
    run_cases)
def sinusoidal(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        (T, d, base), k = case["args"], case["shift"]
        what = f"sinusoidal_encoding({T}, {d}, base={base:g})"
        pe = as_tensor(what, got, (T, d))
        if T - k > d:  # whatever the layout, fit a linear map PE[p] -> PE[p + k] by least squares (with no more
            # rows than unknowns any table fits exactly, and lstsq's rank-deficient answer varies with the BLAS)
            fit = pe[:-k] @ torch.linalg.lstsq(pe[:-k], pe[k:]).solution
            compare(f"{what}: PE[pos + {k}] against its best linear fit from PE[pos]", fit, pe[k:], 1e-3,
                    f"PE[pos + {k}] is not a linear function of PE[pos]; each pair of dimensions must be (sin, cos) "
                    "of the same angle pos * w_i")
        compare(what, pe, ref.sinusoid_table(T, d, base), 1e-4, "PE[pos, 2i] = sin(pos / base^(2i/d)), "
                "PE[pos, 2i+1] = cos(pos / base^(2i/d)); use the base given", {
                    "sin and cos are swapped: sin goes to the even dimensions 2i, cos to the odd 2i+1":
                        ref.sinusoid_table(T, d, base, "swapped"),
                    "the 2017 paper interleaves: PE[:, 0::2] = sin, PE[:, 1::2] = cos, not all sines then all cosines":
                        ref.sinusoid_table(T, d, base, "concatenated")})
    return "matches the closed form, and PE[pos + k] is a fixed linear map (a rotation) of PE[pos]"


def plain_tables(T: int, d: int, base: float, positions: list) -> list[dict]:
    return [{"what": f"rope_cos_sin({T}, {d}, base={base:g}, position_ids={p if p is None else p.tolist()}): "
             "(cos, sin) (vs transformers' LlamaRotaryEmbedding)", "args": [T, d, base], "kwargs": {"position_ids": p},
             "want": (base, torch.arange(T) if p is None else p),
             "hint": "angles = position * base^(-2i/head_dim) for i < head_dim/2; table = cat(angles, angles)"}
            for p in positions]


def compare_tables(cases: list[dict], tables: list, atol: float) -> None:
    """Each (cos, sin) against transformers' for the case's "want": (base, positions[, scaling])."""
    for case, got in zip(cases, tables, strict=True):
        (T, d, _), (base, p, *scaling) = case["args"], case["want"]
        llama = lambda positions, *args: torch.stack(ref.llama_cos_sin(d, base, positions, *args))
        want, got = llama(p, *scaling), attempt(torch.stack, got) if isinstance(got, (tuple, list)) else got
        compare(case["what"], as_tensor(case["what"], got, (2, T, d)), want, atol, case["hint"], {} if scaling else {
                    "the table repeats each angle twice in a row (interleaved layout); Llama's rotate-half layout is "
                    "cat(freqs, freqs): angle i at columns i and i + d/2": want[..., :d // 2].repeat_interleave(2, -1),
                    "the positions were rounded: bfloat16 (and float16) cannot represent every integer above 256 "
                    "(2048); compute the angles in float32": lambda: llama(p.to(torch.bfloat16)),
                    "position_ids was ignored: use the position_ids given, not arange(T)":
                        lambda: llama(torch.arange(T))})


def rope_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d, T = [8, 16][int(torch.randint(2, (1,), generator=g))], 12
    p = torch.cat([torch.tensor([0, 1, 7, 100, 1000, 4095]), torch.randint(4096, (T - 6,), generator=g)])
    base, x = [10000.0, 500000.0][int(torch.randint(2, (1,), generator=g))], torch.randn(2, 3, T, d, generator=g)
    # float32 angles p * theta_i carry a rounding error of order p * 1e-7 rad: 1e-3 allows p up to ~4000
    return {"cases": plain_tables(T, d, base, [None, p]), "atol": 1e-3,
            "apply": [(x, *(t.float() for t in ref.llama_cos_sin(d, base, torch.arange(T))))]}


def rope_collect(inputs: dict, rotate_half, rope_cos_sin, apply_rope) -> dict:
    return {"tables": run_cases(inputs, rope_cos_sin)["outputs"], "half": [rotate_half(x) for x, *_ in inputs["apply"]],
            "rotated": [apply_rope(*args) for args in inputs["apply"]]}


@define("03.rope", rope_inputs, rope_collect)
def rope(inputs: dict, out: dict) -> str:
    compare_tables(inputs["cases"], out["tables"], inputs["atol"])
    for case, half, got in zip(inputs["apply"], out["half"], out["rotated"], strict=True):
        x, c, s = (t.double() for t in case)
        compare(f"rotate_half on x of shape {tuple(x.shape)} (vs transformers' Llama rotate_half)", half,
                ref.hf("llama", "rotate_half")(x), hint="split the last axis into halves x1, x2; return cat(-x2, x1)")
        compare(f"apply_rope(x, cos, sin) (vs transformers' apply_rotary_pos_emb), x of shape {tuple(x.shape)}", got,
                ref.llama_apply_rope(x.reshape(-1, 1, *x.shape[-2:]), c, s).reshape(x.shape), suspects={
                    "this rotates the pairs (2i, 2i+1), the interleaved layout, but the table is in the rotate-half "
                    "layout, where dimension i pairs with i + d/2: use x * cos + rotate_half(x) * sin":
                        x * c + torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2) * s},
                hint="apply_rope(x) = x * cos + rotate_half(x) * sin, with cos and sin broadcast over batch and heads")
    return "rotate_half, the cos/sin tables and apply_rope match Hugging Face's Llama"


def rope_properties_inputs(seed: int) -> dict:
    g = seeded_generator(seed)  # T = 10 positions, head_dim 16
    return {"base": 100.0, "shifts": [0, 1, 13, 250 + int(torch.randint(50, (1,), generator=g))],
            "qk": torch.randn(2, 16, generator=g), "x": torch.randn(2, 3, 10, 16, generator=g)}


def rope_properties_collect(inputs: dict, rope_cos_sin, apply_rope) -> dict:
    (T, d), base = inputs["x"].shape[-2:], inputs["base"]
    rotate = lambda t, s=0: apply_rope(t, *rope_cos_sin(T, d, base, position_ids=torch.arange(T) + s))
    q, k = (t.expand(1, 1, T, d) for t in inputs["qk"])  # the same q (k) at every position m + s
    return {"scores": [(rotate(q, s) @ rotate(k, s).transpose(-1, -2))[0, 0] for s in inputs["shifts"]],
            "rotated": rotate(inputs["x"])}


@define("03.rope_properties", rope_properties_inputs, rope_properties_collect)
def rope_properties(inputs: dict, out: dict) -> str:
    (T, d), x = inputs["x"].shape[-2:], inputs["x"].double()
    rotated = as_tensor("apply_rope(x, *rope_cos_sin(T, head_dim))", out["rotated"], x.shape)
    compare("norms |apply_rope(x)| against |x| (a rotation preserves lengths)", rotated.norm(dim=-1), x.norm(dim=-1),
            1e-4, "each pair (x_i, x_{i+d/2}) must be rotated by the same angle: cos and sin of one table row")
    scores = as_tensor("scores <R_m q, R_n k>", out["scores"][0], (T, T))
    for s, shifted in zip(inputs["shifts"][1:], out["scores"][1:], strict=True):
        compare(f"<R_(m+{s}) q, R_(n+{s}) k> against <R_m q, R_n k> (RoPE scores may depend only on m - n)", shifted,
                scores, 1e-3, "rotate q and k with the cos and sin of their own positions (position_ids)")
    # The RoFormer paper's interleaved form is the same function with the head dimensions in another order.
    interleave = lambda t: torch.stack(t.chunk(2, -1), -1).flatten(-2)  # (t_0, t_d/2, t_1, t_d/2+1, ...)
    compare("apply_rope(x) with the head dimensions reordered (0, d/2, 1, d/2 + 1, ...) against the paper's "
            "interleaved rotation of pairs (x_2i, x_2i+1) by angle m * theta_i", interleave(rotated),
            ref.rotate_interleaved(interleave(x), ref.rope_angles(torch.arange(T), d, inputs["base"])), 1e-4,
            "dimension i of the rotate-half layout must pair with dimension i + d/2, both with angle m * theta_i")
    return ("scores depend only on m - n, norms are preserved, and it equals the interleaved rotation after permuting "
            "the head dimensions")


def wrong_slopes(n: int) -> dict[str, list[float]]:
    p = 2 ** (n - 1).bit_length()  # the smallest power of two >= n
    return {f"these are the first {n} slopes of {p} heads; the paper takes the {p // 2} slopes of {p // 2} heads, then "
            f"every other slope of {p} heads": ref.alibi_slopes(p)[:n],
            "2^(-8(i+1)/n) is the rule for powers of two only; for other n the paper takes the slopes of the closest "
            "smaller power of two p, then every other slope of 2p heads": [2 ** (-8 * (i + 1) / n) for i in range(n)]}


alibi_slopes = table(
    "03.alibi_slopes", lambda g: [{"what": f"alibi_slopes({n}) (vs the ALiBi paper{', hand-computed' * (n in (8, 12))}"
                                   ")", "args": [n]} for n in (8, 12, 1, 2, 4, 6, 16, 20)],
    lambda c: torch.tensor({8: ref.SLOPES_8, 12: ref.SLOPES_12}.get(c["args"][0]) or ref.alibi_slopes(c["args"][0]),
                           dtype=torch.float64),
    "the paper's slopes for 8 and 12 heads (hand-computed) and for 1, 2, 4, 6, 16 and 20 heads", atol=1e-6,
    hint="for n a power of two, the slopes are 2^(-8/n), 2^(-16/n), ..., 2^(-8)",
    suspects=lambda c: {why: torch.tensor(w, dtype=torch.float64) for why, w in wrong_slopes(c["args"][0]).items()})


@define("03.alibi_bias", table_inputs(lambda g: [{"what": f"alibi_bias({H}, {T_q}, {T_k})", "args": [H, T_q, T_k]}
                                                 for H, T_q, T_k in ((4, 6, 6), (8, 1, 9), (12, 3, 7))]), run_cases)
def alibi_bias(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        (H, T_q, T_k), slopes = case["args"], ref.alibi_slopes(case["args"][0])
        keep = causal(T_q, T_k).expand(H, T_q, T_k)  # the entries above the diagonal are masked: any value will do
        want = ref.alibi_bias(slopes, T_q, T_k)[keep]
        compare(f"{case['what']} on the entries j <= i that the causal mask keeps (vs -m_h * (i - j), paper slopes)",
                as_tensor(case["what"], got, (H, T_q, T_k))[keep], want, 1e-5,
                "bias[h, i, j] = -m_h * (i - j), where query i sits at position T_k - T_q + i", {
                    "the sign is flipped: ALiBi is a penalty, -m_h * distance, so that distant keys get lower scores; "
                    "yours rewards them": -want,
                    "the queries are the LAST T_q positions (as when decoding with a cache): query i is at "
                    "T_k - T_q + i": ref.alibi_bias(slopes, T_k, T_k)[:, :T_q][keep]})
    return "-m_h * (i - j) with the paper's slopes, for square, single-query and rectangular shapes"


POS = {  # the reference a case names, and the hint, by CausalSelfAttention's pos
    "rope": ("transformers' LlamaAttention with the same weights", "split heads, then rotate q and k (never v) with "
             "rope_cos_sin(T, d_head, rope_base, scaling=rope_scaling), causal softmax, o_proj"),
    None: ("F.scaled_dot_product_attention, causal", "scores q k^T / sqrt(d_head), causal mask, softmax over the keys, "
           "then o_proj"),
    "alibi": ("F.scaled_dot_product_attention with the ALiBi bias as a float mask", "add alibi_bias(H, T, T) to the "
              "scaled scores q k^T / sqrt(d_head) before the causal mask and the softmax")}


def attention_cases(g: torch.Generator, d_model: int, T: int, layers: list[tuple], scale: float = 1.0) -> list[dict]:
    """CausalSelfAttention(d_model, H, **kwargs) for each (H, kwargs) of layers, with the same weights and input."""
    x = scale * torch.randn(2, T, d_model, generator=g)
    weights = attention_weights("", d_model, g, bias=False, out="o_proj")
    return [{"what": f"CausalSelfAttention({d_model}, {H}, {', '.join(f'{k}={v!r}' for k, v in kw.items())}) (vs "
             f"{POS[kw['pos']][0]})", "init": [d_model, H], "init_kwargs": kw, "weights": weights, "args": [x],
             "hint": POS[kw["pos"]][1]} for H, kw in layers]


def attention_reference(case: dict, slopes: list | None = None, sign: float = 1.0, masked: bool = True):
    """LlamaAttention for pos="rope", else causal SDPA with the ALiBi bias or none (or a bug: other arguments)."""
    (_, H), kw, x = case["init"], case["init_kwargs"], case["args"][0]
    T, scaling = x.shape[1], kw.get("rope_scaling") or {"type": "default", "factor": 1.0}
    if kw["pos"] == "rope":
        return ref.llama_attention(case["weights"], x, H, rope_base=kw.get("rope_base", 10000.0),
                                   rope_type=scaling["type"], rope_factor=scaling["factor"])
    bias = sign * ref.alibi_bias(slopes or ref.alibi_slopes(H), T, T) if kw["pos"] else torch.zeros(T, T).double()
    return ref.gqa(case["weights"], x, H, H, bias + additive(causal(T)) if masked else bias)


# TOOLKIT: references.llama_attention cannot build the known RoPE bugs (RoPE on v too, no causal mask)
def rope_attention_bug(case: dict, rotated: str = "qk", masked: bool = True) -> torch.Tensor:
    (_, H), w, x = case["init"], doubled(case["weights"]), case["args"][0].double()
    B, T, C = x.shape
    q, k, v = ((x @ w[f"{n}_proj.weight"].T).view(B, T, H, -1).transpose(1, 2) for n in "qkv")
    cos, sin = ref.llama_cos_sin(C // H, case["init_kwargs"].get("rope_base", 10000.0), torch.arange(T))
    q, k, v = (ref.llama_apply_rope(t, cos, sin) if n in rotated else t for n, t in zip("qkv", (q, k, v)))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=masked)
    return out.transpose(1, 2).reshape(B, T, C) @ w["o_proj.weight"].T


def attention_suspects(case: dict) -> dict:
    pos, (_, H) = case["init_kwargs"]["pos"], case["init"]
    bug = lambda **kw: lambda: (rope_attention_bug if pos == "rope" else attention_reference)(case, **kw)
    suspects = {"no causal mask: query i must not attend to keys j > i": bug(masked=False)}
    if pos == "rope":
        return suspects | {
            "no rotation at all: with pos='rope', apply RoPE to q and k after splitting the heads": bug(rotated=""),
            "RoPE was applied to the values too: rotate only q and k, which meet in the scores; v carries content":
                bug(rotated="qkv")}
    # with pos=None these equal the reference, so they never match a wrong output
    return suspects | {f"ALiBi slopes: {why}": bug(slopes=wrong) for why, wrong in wrong_slopes(H).items()} | {
        "the bias has the wrong sign: ALiBi subtracts m_h * (i - j), a penalty growing with distance": bug(sign=-1.0)}


rope_attention = table(
    "03.rope_attention",
    lambda g: attention_cases(g, 32, 10, [(4, {"pos": "rope", "rope_base": b}) for b in (1e4, 100.0)]),
    attention_reference, "with pos='rope' the attention equals Hugging Face's LlamaAttention, weight for weight",
    suspects=attention_suspects, forbid=ATTENTION_BUILTINS)
alibi_attention = table(
    "03.alibi_attention",
    lambda g: attention_cases(g, 48, 20, [(12, {"pos": None}), (12, {"pos": "alibi"}), (8, {"pos": "alibi"})], 2.0),
    attention_reference, "with pos=None and pos='alibi' the attention equals F.scaled_dot_product_attention",
    suspects=attention_suspects, forbid=ATTENTION_BUILTINS)


def rope_scaling_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    d, base, L, P = 8 * int(torch.randint(1, 3, (1,), generator=g)), 10000.0, 16, torch.randint(64, (10,), generator=g)
    # Exact rules: matching them implies the verdict's properties (PI maps s * p onto p; NTK's fastest/slowest pair)
    hints = {"linear": "position interpolation divides every position by the factor: angle = (p / s) * theta_i",
             "ntk": "NTK-aware scaling keeps the positions and changes the base: base' = base * s^(d / (d - 2)), "
                    "which keeps the fastest pair and interpolates the slowest by exactly s"}
    case = lambda kind, s, what, T, p, want: {
        "what": f"scaling={{'type': '{kind}', 'factor': {s:g}}}{what}", "args": [T, d, base], "want": want,
        "kwargs": {"position_ids": p, "scaling": {"type": kind, "factor": s}}, "hint": hints[kind]}
    cases = []
    for s in (2.0, 4.0):
        cases += [case("linear", s, ": (cos, sin) (vs transformers' 'linear' RoPE)", 10, P, (base, P, "linear", s)),
                  case("ntk", s, ": (cos, sin) (vs base' = base * s^(d/(d-2)))", 10, P, (base * s ** (d / (d - 2)), P)),
                  # transformers' dynamic NTK with factor 1 at length s * L is the static NTK-aware scaling of factor s
                  case("ntk", s, f" over {int(s * L)} positions (vs transformers' dynamic NTK RoPE at length s * L)",
                       int(s * L), None, (base, torch.arange(int(s * L)), "dynamic", 1.0, L))]
    return {"cases": cases + [case("ntk", 1.0, " against no scaling", L, None, (base, torch.arange(L)))]}


@define("03.rope_scaling", rope_scaling_inputs, run_cases)
def rope_scaling(inputs: dict, out: dict) -> str:
    compare_tables(inputs["cases"], out["outputs"], 1e-4)
    return ("PI matches transformers' linear RoPE and maps s * p onto p; NTK-aware scaling changes the base as "
            "d/(d-2), keeps the fastest pair and interpolates the slowest by s")
