"""Checks of Lab 8: state space models, from S4D to Mamba and Mamba-2.

References: the zero-order hold as the matrix exponential of Van Loan's block matrix [[A, B], [0, 0]] dt
(``torch.linalg.matrix_exp``) and as its closed form (exp(dt A), expm1(dt A) / A B, dt B where A = 0); the diagonal
LTI recurrence as a float64 Python loop, and the Vandermonde kernel of S4D (state-spaces/s4's ``s4d.py``: ZOH, 2 Re
for conjugate pairs); transformers' pure-PyTorch ``mamba_selective_scan`` (``.__wrapped__``, so no kernel library
runs) for the selective scan, on float32 inputs, which its internal rounding of B and u to float32 leaves exact;
a float64 Python-loop scan for the parallel scan, and the loop's own time, measured in the same run, for its
speed; transformers' ``MambaMixer`` (its torch path) with the check's weights for the Mamba block, and its
decoding cache for ``step`` and its states; for Mamba-2's chunked SSD a float64 loop over positions, transformers'
``mamba2_chunk_scan`` (``.__wrapped__``, float32 inside, hence a relative tolerance) and transformers' Mamba-1 scan
on the same scalar-A problem. Where the lab asks students to write what transformers' Mamba code does, the
collect watches for any call into transformers while the student's code runs (``PackageCalls``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from labkit.checks import (as_tensor, compare, define, forbidden_calls, linear_weights, raised, references as ref,
                           seeded_generator)
from labkit.checks.kernel import PackageCalls, attempt, build


def uniform(g: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=g)


def relative(got, bug: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """``bug``, or ``got`` itself if it is within a relative ``rtol`` of it: a wrong version that blows up (a
    positive A, a negative delta) has values too large for compare's absolute tolerance."""
    near = (isinstance(got, torch.Tensor) and got.shape == bug.shape and torch.isfinite(bug).all()
            and torch.allclose(got.detach().cpu().double(), bug, rtol, 1e-5))
    return got if near else bug


def pair(what: str, got, n: int = 2) -> tuple:
    """A function's tuple of ``n`` results, or an ``AssertionError`` saying what came back instead."""
    if raised(got):
        raise AssertionError(f"{what} raised {raised(got)}")
    if not isinstance(got, (tuple, list)) or len(got) != n:
        raise AssertionError(f"{what}: expected a tuple of {n}, got {type(got).__name__}"
                             + (f" of {len(got)}" if isinstance(got, (tuple, list)) else ""))
    return tuple(got)


def s4d_lin(n: int) -> torch.Tensor:
    """S4D-Lin's n modes, A_n = -1/2 + i pi n (complex128)."""
    return torch.complex(torch.full((n,), -0.5, dtype=torch.float64), math.pi * torch.arange(n, dtype=torch.float64))


def complex_randn(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.complex(torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g,
                                                                                       dtype=torch.float64))


# ---------------------------------------------------------------- 1. the zero-order hold
ZOH_CASES = [  # (what, N, dt, dtype, kind)
    ("a real A (N = 5), against matrix_exp of [[A, B], [0, 0]] dt", 5, 0.1, torch.float64, "real"),
    ("a real A (N = 6) with A = 0 entries (B_bar -> dt B)", 6, 0.3, torch.float64, "zeros"),
    ("S4D-Lin's complex A_n = -1/2 + i pi n (N = 4)", 4, 0.05, torch.complex128, "s4d"),
    ("float32, tiny dt A (about 1e-4), compared as B_bar / dt", 8, 1e-4, torch.float32, "real"),
    ("a complex A with large dt", 3, 2.0, torch.complex128, "complex")]


def zoh_inputs(seed: int, cases=ZOH_CASES) -> dict:
    g, out = seeded_generator(seed), []
    for what, N, dt, dtype, kind in cases:
        if kind == "s4d":
            A = s4d_lin(N)
        elif kind == "complex":
            A = torch.complex(-uniform(g, 0.1, 1.5, N).double(), 3 * torch.randn(N, generator=g).double())
        else:
            A = -uniform(g, 0.1, 2.0, N).double()
            if kind == "zeros":
                A[torch.randperm(N, generator=g)[:2]] = 0.0
        B = complex_randn(g, N) if A.is_complex() else torch.randn(N, generator=g).double()
        out.append({"what": f"discretize_zoh(A, B, dt={dt}) with {what}", "args": [A.to(dtype), B.to(dtype), dt],
                    "scale": dt if dt < 1e-3 else 1.0, "matrix_exp": N <= 6})
    return {"cases": out}


def zoh_collect(inputs: dict, discretize_zoh) -> dict:
    return {"outputs": [attempt(discretize_zoh, *case["args"]) for case in inputs["cases"]]}


def zoh_suspects(A: torch.Tensor, B: torch.Tensor, dt: float, scale: float) -> dict:
    """Wrong B_bar (divided by ``scale``, as compared)."""
    dtA = dt * A
    one = lambda f: (f / scale)
    safe = torch.where(A == 0, torch.ones_like(A), A)
    return {
        "this is Euler's B_bar = dt B (Mamba's simplification): the ZOH's is (exp(dt A) - 1) / A B":
        lambda: one(dt * B),
        "B_bar lacks the 1 / A: (dt A)^-1 (exp(dt A) - 1) dt B = (exp(dt A) - 1) / A B":
        lambda: one(torch.expm1(dtA) * B),
        "B_bar lacks the dt of dt B: (dt A)^-1 (exp(dt A) - 1) dt B = (exp(dt A) - 1) / A B":
        lambda: one(torch.expm1(dtA) / (dt * safe) * B),
        "this is the bilinear transform's B_bar = dt B / (1 - dt A / 2): the exercise is the zero-order hold":
        lambda: one(dt * B / (1 - dtA / 2)),
        "exp(dt A) - 1 loses its digits when dt A is small (cancellation): use torch.expm1(dt A)":
        lambda: one(torch.where(A == 0, dt * B, (torch.exp(dtA) - 1) / safe * B))}


ZOH_HINT = "A_bar = exp(dt A); B_bar = expm1(dt A) / A * B, and its limit dt B where A = 0 (torch.where)"


@define("08.discretize_zoh", zoh_inputs, zoh_collect)
def discretize_zoh(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        A, B, dt = case["args"]
        what, scale = case["what"], case["scale"]
        A_bar, B_bar = pair(what, got)
        how = "matrix_exp of [[A, B], [0, 0]] dt" if case["matrix_exp"] else "the closed form"
        want_A, want_B = (ref.zoh_reference if case["matrix_exp"] else ref.zoh_diagonal)(A, B, dt)
        hint = ZOH_HINT + (". Where A = 0, expm1(dt A) / A is 0 / 0" if (A == 0).any() else "")
        suspects_A = {
            "A_bar = exp(A): it is exp(dt A)": lambda: torch.exp(A.to(want_A.dtype)),
            "this is the bilinear transform's A_bar = (1 + dt A / 2) / (1 - dt A / 2): the exercise is the "
            "zero-order hold": lambda: (1 + dt * A / 2) / (1 - dt * A / 2)}
        compare(f"{what}: A_bar (vs {how})", A_bar, want_A, 1e-5, ZOH_HINT, suspects_A)
        got_B = B_bar / scale if isinstance(B_bar, torch.Tensor) else B_bar
        compare(f"{what}: B_bar{' / dt' if scale != 1 else ''} (vs {how})", got_B, want_B / scale, 1e-5, hint,
                zoh_suspects(A, B, dt, scale))
    return ("equals matrix_exp of [[A, B], [0, 0]] dt and the closed form, for real and complex A, with A = 0 entries "
            "(dt B) and tiny dt A (expm1)")


# ---------------------------------------------------------------- 2. recurrent and convolutional modes
MODES_CASES = [  # (what, N, L, kind)
    ("a real diagonal A_bar in (0.8, 0.99)", 8, 32, "real"),
    ("S4D-Lin's complex modes (N/2 = 4, 2 Re)", 4, 64, "s4d"),
    ("S4D-Lin's complex modes, odd L", 3, 17, "s4d"),
    ("L = 1", 4, 1, "real")]


def modes_inputs(seed: int, cases=MODES_CASES) -> dict:
    """float64 systems whose kernel decays slowly, so that a convolution that wraps around (n = L) shows."""
    g, out = seeded_generator(seed), []
    for what, N, L, kind in cases:
        if kind == "s4d":
            dt = 0.02 + 0.03 * float(torch.rand(1, generator=g))
            A_bar, B_bar = ref.zoh_diagonal(s4d_lin(N), complex_randn(g, N), dt)
            C = complex_randn(g, N)
        else:
            A_bar, B_bar, C = (uniform(g, 0.8, 0.99, N).double(), torch.randn(N, generator=g).double(),
                               torch.randn(N, generator=g).double())
        out.append({"what": f"{{}}(u, A_bar, B_bar, C) with {what}, N = {N}, L = {L}",
                    "args": [torch.randn(L, generator=g).double(), A_bar, B_bar, C]})
    return {"cases": out}


def modes_collect(inputs: dict, ssm_recurrent, ssm_convolution) -> dict:
    return {"recurrent": [attempt(ssm_recurrent, *case["args"]) for case in inputs["cases"]],
            "convolution": [attempt(ssm_convolution, *case["args"]) for case in inputs["cases"]]}


def convolution_variant(u: torch.Tensor, K: torch.Tensor, how: str) -> torch.Tensor:
    """Wrong convolutions of u by K (L,), float64: "circular" (an FFT over n = L), "centre" (the full convolution's
    middle L outputs, as padding on both sides gives), "last" (its last L outputs)."""
    L = len(u)
    if how == "circular":
        return torch.fft.irfft(torch.fft.rfft(u, n=L) * torch.fft.rfft(K, n=L), n=L)
    full = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[:2 * L - 1]
    start = L // 2 if how == "centre" else L - 1
    return full[start:start + L]


def modes_suspects(u, A_bar, B_bar, C) -> dict:
    L, u = len(u), u.double()
    want = ref.lti_recurrent_reference(u, A_bar, B_bar, C)
    K = ref.lti_kernel_reference(A_bar, B_bar, C, L)
    complex_ = A_bar.is_complex()
    suspects = {
        "y_k reads the state before the update (x_{k-1}): y_k = C . x_k, with x_k = A_bar x_{k-1} + B_bar u_k, so "
        "that y_0 = C . B_bar u_0": lambda: F.pad(want[:-1], (1, 0)),
        "the kernel starts at C A_bar B_bar: K_0 = C . B_bar, K_k = C . A_bar^k B_bar for k = 0 .. L - 1":
        lambda: ref.causal_convolution_reference(u, ref.lti_kernel_reference(A_bar, A_bar * B_bar, C, L)),
        "this is a circular convolution: an FFT over n = L wraps around (y_0 gets the tail of the sequence); take "
        "rfft and irfft with n = 2 L and keep the first L outputs": lambda: convolution_variant(u, K, "circular"),
        "this convolution is not causal: it keeps the middle L outputs of the full convolution (padding on both "
        "sides), so y_k reads later inputs; keep the first L": lambda: convolution_variant(u, K, "centre"),
        "this convolution keeps the last L outputs of the full convolution: keep the first L":
        lambda: convolution_variant(u, K, "last")}
    if not complex_:
        suspects["this is 2 Re(.) of a real system: 2 Re(.) adds up the conjugate pairs of a complex system; a real "
                 "system's output is y itself"] = 2 * want
    if complex_:
        suspects |= {
            "this is Re(.) of the complex system: N/2 modes stand for N real states in conjugate pairs, whose outputs "
            "add up to 2 Re(.)": want / 2,
            "C is conjugated (torch.vdot and .H conjugate their first argument): y_k = 2 Re(sum_n C_n x_k,n)":
            lambda: ref.lti_recurrent_reference(u, A_bar, B_bar, C.conj())}
    return suspects


@define("08.ssm_modes", modes_inputs, modes_collect)
def ssm_modes(inputs: dict, out: dict) -> str:
    for case, rec, conv in zip(inputs["cases"], out["recurrent"], out["convolution"], strict=True):
        u, A_bar, B_bar, C = case["args"]
        want = ref.lti_recurrent_reference(u, A_bar, B_bar, C)
        suspects = modes_suspects(u, A_bar, B_bar, C)
        compare(case["what"].format("ssm_recurrent") + " (vs a float64 loop)", rec, want, 1e-5,
                "x_k = A_bar x_{k-1} + B_bar u_k from x = 0, y_k = C . x_k; 2 Re(.) for a complex system", suspects)
        compare(case["what"].format("ssm_convolution") + " (vs the recurrent mode, a float64 loop)", conv, want,
                1e-5, "K_k = C . A_bar^k B_bar (2 Re for a complex system); y = irfft(rfft(u, n=2L) rfft(K, n=2L), "
                "n=2L)[:L]", suspects)
    return ("the recurrence equals a float64 loop, and the FFT convolution over 2L points equals it, for real and "
            "complex (2 Re) systems, odd L and L = 1")


# ---------------------------------------------------------------- 3. S4D's kernel
S4D_CASES = [  # (what, N, dt, L, kind)
    ("S4D-Lin, N/2 = 4 modes", 4, 0.05, 32, "s4d"), ("S4D-Lin, N/2 = 8 modes", 8, 0.01, 100, "s4d"),
    ("S4D-Lin, L = 1", 3, 0.1, 1, "s4d"), ("a real A (-1 .. -0.1)", 5, 0.2, 16, "real")]


def s4d_inputs(seed: int, cases=S4D_CASES) -> dict:
    g, out = seeded_generator(seed), []
    for what, N, dt, L, kind in cases:
        if kind == "s4d":
            A, B, C = s4d_lin(N), complex_randn(g, N), complex_randn(g, N)
        else:
            A, B, C = -uniform(g, 0.1, 1.0, N).double(), torch.randn(N, generator=g).double(), torch.randn(
                N, generator=g).double()
        out.append({"what": f"s4d_kernel(A, B, C, dt={dt}, L={L}) with {what}", "args": [A, B, C, dt, L]})
    return {"cases": out}


def s4d_suspects(A, B, C, dt, L) -> dict:
    A_bar, B_bar = ref.zoh_diagonal(A, B, dt)
    K = lambda a, b: ref.lti_kernel_reference(a, b, C, L)
    suspects = {
        "the powers are exp(A k): they are A_bar^k = exp(dt A k)": lambda: K(torch.exp(A), B_bar),
        "this is Euler's B_bar = dt B: S4D's kernel uses the ZOH, (exp(dt A) - 1) / A B": lambda: K(A_bar, dt * B),
        "B_bar lacks the 1 / A: (exp(dt A) - 1) / A B": lambda: K(A_bar, torch.expm1(dt * A) * B),
        "B_bar lacks the dt of dt B: (dt A)^-1 (exp(dt A) - 1) dt B = (exp(dt A) - 1) / A B":
        lambda: K(A_bar, B_bar / dt),
        "the kernel starts at k = 1: K_k = 2 Re(sum_n C_n B_bar_n A_bar_n^k) for k = 0 .. L - 1":
        lambda: K(A_bar, A_bar * B_bar)}
    if A.is_complex():
        suspects["this is Re(.): N/2 modes stand for N real states in conjugate pairs, 2 Re(.)"] = lambda: K(
            A_bar, B_bar) / 2
    else:
        suspects["this is 2 Re(.) of a real A: 2 Re(.) adds up the conjugate pairs of complex modes; a real A's kernel "
                 "is the sum itself"] = lambda: 2 * K(A_bar, B_bar)
    return suspects


S4D_HINT = "B_bar = (exp(dt A) - 1) / A B (the ZOH); K_k = 2 Re(sum_n C_n B_bar_n exp(dt A_n k)), k = 0 .. L - 1"


def s4d_collect(inputs: dict, s4d_kernel) -> dict:
    return {"outputs": [attempt(s4d_kernel, *case["args"]) for case in inputs["cases"]]}


@define("08.s4d_kernel", s4d_inputs, s4d_collect)
def s4d_kernel(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        compare(case["what"] + " (vs the ZOH and the Vandermonde product in float64)", got,
                ref.s4d_kernel_reference(*case["args"]), 1e-5, S4D_HINT, s4d_suspects(*case["args"]))
    return "equals S4D's kernel (ZOH, Vandermonde, 2 Re) for S4D-Lin's complex modes, a real A and L = 1"


# ---------------------------------------------------------------- 4. the selective scan
SCAN_CASES = [  # (what, batch, D, N, L, options: D, z, delta_bias, softplus)
    ("plain", 2, 4, 3, 9, ""), ("with D", 2, 4, 3, 9, "D"), ("with z", 1, 3, 5, 6, "z"),
    ("with delta_bias, no softplus", 2, 3, 4, 7, "bias"), ("softplus, no delta_bias", 2, 3, 4, 7, "softplus"),
    ("with D, z, delta_bias and softplus", 2, 5, 4, 11, "D z bias softplus"),
    ("everything, N = L = 6", 1, 3, 6, 6, "D z bias softplus"), ("L = 1", 2, 3, 4, 1, "D z bias softplus")]


def scan_inputs(seed: int, cases=SCAN_CASES) -> dict:
    """float32 inputs, which transformers' rounding of B and u to float32 leaves exact: its float64 path is then the
    exact answer, and a float32 or float64 student is judged by its own rounding only. A = -exp(A_log); delta raw
    (about -1 .. 1) with softplus, positive (0.25 .. 0.8, a bias within 0.2) without."""
    g, out = seeded_generator(seed), []
    for what, batch, D, N, L, options in cases:
        softplus = "softplus" in options
        args = {"u": torch.randn(batch, D, L, generator=g),
                "delta": (0.7 * torch.randn(batch, D, L, generator=g) if softplus
                          else uniform(g, 0.25, 0.8, batch, D, L)),
                "A": -torch.exp(0.5 * torch.randn(D, N, generator=g)),
                "B": torch.randn(batch, N, L, generator=g), "C": torch.randn(batch, N, L, generator=g)}
        kwargs = {"D": 1 + 0.5 * torch.randn(D, generator=g) if "D" in options.split() else None,
                  "z": torch.randn(batch, D, L, generator=g) if "z" in options.split() else None,
                  "delta_bias": ((0.5 * torch.randn(D, generator=g) if softplus else uniform(g, -0.2, 0.2, D))
                                 if "bias" in options else None),
                  "delta_softplus": softplus, "return_last_state": True}
        out.append({"what": f"selective_scan ({what}: u (B={batch}, D={D}, L={L}), N = {N})", "args": args,
                    "kwargs": kwargs})
    return {"cases": out, "forbidden": ["transformers"]}


def scan_collect(inputs: dict, selective_scan) -> dict:
    """Each case's (y, last state), the names of the tensors the call changed in place ("" if none; it gets
    copies), and the packages of ``inputs["forbidden"]`` that the student's code called."""
    outputs, changed = [], []
    with PackageCalls(inputs["forbidden"]) as calls, torch.no_grad():
        for case in inputs["cases"]:
            given = case["args"] | case["kwargs"]
            copies = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in given.items()}
            outputs.append(attempt(selective_scan, **copies))
            changed.append(", ".join(k for k, v in copies.items() if isinstance(v, torch.Tensor)
                                     and not (v.shape == given[k].shape and torch.equal(v, given[k]))))
    return {"outputs": outputs, "changed": changed, "called": calls.called}


def unchanged(what: str, changed: str, fix: str) -> None:
    """Fail if the student's call changed its arguments ``changed`` (names, "" if none) in place."""
    if changed:
        raise AssertionError(f"{what}: changed {changed} in place (an in-place operation such as +=, *= or a slice "
                             f"assignment on the tensor it was given): the caller's tensors must stay as they were; "
                             f"{fix}")


def scan_variant(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, bug: str = ""):
    """The selective scan in float64 with one ``bug`` (see the suspects): returns (y, h_L)."""
    u, delta, A, B, C, D, z, delta_bias = (None if t is None else t.double()
                                           for t in (u, delta, A, B, C, D, z, delta_bias))
    batch, _, L = u.shape
    N = A.shape[1]
    if bug == "B_reshaped":
        B = B.reshape(batch, L, N).transpose(1, 2)
    if bug == "C_reshaped":
        C = C.reshape(batch, L, N).transpose(1, 2)
    if delta_bias is not None and bug not in ("bias_after", "no_bias"):
        delta = delta + delta_bias[:, None]
    if (delta_softplus or bug == "softplus_always") and bug != "no_softplus":
        delta = F.softplus(delta)
    if delta_softplus and bug == "softplus_twice":
        delta = F.softplus(delta)
    if delta_bias is not None and bug == "bias_after":
        delta = delta + delta_bias[:, None]
    if bug == "gate_before" and z is not None:
        u = u * F.silu(z)
    A = -torch.exp(A) if bug == "neg_exp" else A
    dA = torch.exp(A[None, :, None, :] if bug == "exp_A" else delta[..., None] * A[:, None, :])  # (B, D, L, N)
    dA = dA.expand(batch, -1, L, -1)
    step = torch.expm1(delta[..., None] * A[:, None, :]) / A[:, None, :] if bug == "zoh_B" else delta[..., None]
    step = 1 if bug == "no_delta_input" else step
    dBu = step * B.transpose(1, 2)[:, None] * u[..., None]  # (B, D, L, N)
    h = torch.zeros(batch, u.shape[1], N, dtype=torch.float64)
    ys, before = [], h
    for t in range(L):
        before = h
        h = dA[:, :, t] * h + (0 if bug == "skip_first" and t == 0 else dBu[:, :, t])
        ys.append(((before if bug == "previous" else h) * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    h = before if bug == "last_before" else h
    if D is not None and bug not in ("no_D", "D_after_gate"):
        y = y + D[:, None] * u
    if z is not None and bug != "gate_before":
        y = y * {"gate_no_silu": z, "gate_sigmoid": torch.sigmoid(z)}.get(bug, F.silu(z))
    if D is not None and bug == "D_after_gate":
        y = y + D[:, None] * u
    return y, h


SCAN_BUGS = {
    "exp_A": "dA = exp(A): the discretised decay is exp(delta A)",
    "neg_exp": "A is negated and exponentiated again: the caller passes A = -exp(A_log) already; use A as it is",
    "zoh_B": "this is the ZOH's B_bar = (exp(delta A) - 1) / A B: Mamba takes Euler's delta B u for the input",
    "no_softplus": "softplus is missing: with delta_softplus=True, delta = softplus(delta + delta_bias)",
    "softplus_always": "softplus is applied although delta_softplus=False: delta = softplus(delta + delta_bias) only "
                       "with delta_softplus=True, else delta + delta_bias",
    "softplus_twice": "softplus is applied twice: delta = softplus(delta + delta_bias), once",
    "bias_after": "delta_bias is added after softplus: delta = softplus(delta + delta_bias)",
    "no_bias": "delta_bias is missing: delta + delta_bias, then softplus if delta_softplus (the bias counts with and "
               "without softplus)",
    "no_delta_input": "the input lacks its delta: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t",
    "previous": "y_t reads the state before the update: y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + "
                "delta_t B_t u_t, which includes the input at t",
    "skip_first": "the first input is dropped: h_1 = delta_1 B_1 u_1 (from h_0 = 0)",
    "no_D": "the skip term D u is missing: y += D u",
    "gate_before": "the gate is applied to u before the scan: y = (scan + D u) * silu(z), after it",
    "gate_no_silu": "the gate multiplies by z: it multiplies by silu(z)",
    "gate_sigmoid": "the gate multiplies by sigmoid(z): it multiplies by silu(z) = z sigmoid(z)",
    "D_after_gate": "D u is added after the gate: y = (scan + D u) * silu(z)",
    "B_reshaped": "B is read as (B, L, N): its layout is (B, N, L), as in Mamba's selective_scan_ref (transpose, not "
                  "reshape)",
    "C_reshaped": "C is read as (B, L, N): its layout is (B, N, L), as in Mamba's selective_scan_ref (transpose, not "
                  "reshape)",
    "last_before": "the last state is the one before the last step: return h_L, the state after the last input"}
def scan_bug_applies(bug: str, kwargs: dict) -> bool:
    """Whether ``bug`` changes the output of a call with these keyword arguments (else it is no suspect)."""
    if bug == "softplus_always":
        return not kwargs.get("delta_softplus")
    needs = {"no_softplus": ("delta_softplus",), "softplus_twice": ("delta_softplus",), "no_bias": ("delta_bias",),
             "bias_after": ("delta_bias", "delta_softplus"), "no_D": ("D",), "gate_before": ("z",),
             "gate_no_silu": ("z",), "gate_sigmoid": ("z",), "D_after_gate": ("D", "z")}.get(bug, ())
    return all(kwargs.get(name) is not None and kwargs.get(name) is not False for name in needs)


SCAN_HINT = ("delta (+ delta_bias, then softplus); h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t from h_0 = 0; "
             "y_t = C_t . h_t; y += D u; y *= silu(z)")


@define("08.selective_scan", scan_inputs, scan_collect)
def selective_scan(inputs: dict, out: dict) -> str:
    forbidden_calls("selective_scan", out)
    for case, got, changed in zip(inputs["cases"], out["outputs"], out["changed"], strict=True):
        what, args, kwargs = case["what"], case["args"], dict(case["kwargs"])
        y, h = pair(f"{what} with return_last_state=True", got)
        want_y, want_h = ref.selective_scan_reference(**args, **kwargs)
        kwargs.pop("return_last_state")
        variants = {bug: (lambda bug=bug: scan_variant(**args, **kwargs, bug=bug)) for bug in SCAN_BUGS
                    if scan_bug_applies(bug, kwargs)}
        for i, (part, got_i, want) in enumerate((("y", y, want_y), ("the last state h_L", h, want_h))):
            compare(f"{what}: {part} (vs transformers' mamba_selective_scan, torch path)", got_i, want, 1e-5,
                    SCAN_HINT, {SCAN_BUGS[bug]: lambda v=v, i=i, g=got_i: relative(g, v()[i])
                                for bug, v in variants.items()})
        unchanged(what, changed, "make new tensors (delta = delta + delta_bias[:, None], not delta += ...)")
    return ("equals transformers' mamba_selective_scan (torch path) in y and the last state, with and without D, z "
            "and delta_bias, softplus on and off, and L = 1")


# ---------------------------------------------------------------- 5. the parallel scan
SCAN_SHAPES = [(2, 3, 2), (2, 3, 1), (2, 3, 7), (5, 13), (2, 2, 1024)]


def parallel_inputs(seed: int, shapes=SCAN_SHAPES, speed=(2, 8, 1024)) -> dict:
    """float64 (a in (0.5, 1), b normal) for the values; float32 of ``speed`` (None: no timing) for the speed."""
    g = seeded_generator(seed)
    cases = [{"what": f"parallel_scan(a, b) of shape {shape}", "args": [uniform(g, 0.5, 1.0, *shape).double(),
                                                                        torch.randn(*shape, generator=g).double()]}
             for shape in shapes]
    return {"cases": cases, "speed": None if speed is None else [uniform(g, 0.5, 1.0, *speed),
                                                                 torch.randn(*speed, generator=g)]}


def parallel_collect(inputs: dict, parallel_scan) -> dict:
    """The values (of copies, and the names of those the call changed in place, "" if none), then the student's
    scan of the speed shape, and the best time of it and of a Python loop over t there, on one thread, interleaved
    (7 rounds, and 12 more if the ratio is below 5: a loaded machine slows either)."""
    outputs, changed = [], []
    with torch.no_grad():
        for case in inputs["cases"]:
            copies = [t.clone() for t in case["args"]]
            outputs.append(attempt(parallel_scan, *copies))
            changed.append(", ".join(name for name, t, given in zip("ab", copies, case["args"])
                                     if not (t.shape == given.shape and torch.equal(t, given))))
    if inputs["speed"] is None:
        return {"outputs": outputs, "changed": changed, "speed_output": None, "loop_s": 1.0, "scan_s": 0.0}
    import time

    a, b = inputs["speed"]
    with torch.no_grad():
        speed_output = attempt(parallel_scan, a.clone(), b.clone())

    def loop(a, b):
        h, out = torch.zeros_like(b[..., 0]), torch.empty_like(b)
        for t in range(b.shape[-1]):
            h = a[..., t] * h + b[..., t]
            out[..., t] = h
        return out

    threads, best = torch.get_num_threads(), {"loop_s": float("inf"), "scan_s": float("inf")}
    torch.set_num_threads(1)
    try:
        for rounds in (7, 12):
            for _ in range(rounds):
                for key, fn in (("loop_s", loop), ("scan_s", parallel_scan)):
                    args = (a, b) if fn is loop else (a.clone(), b.clone())
                    start = time.perf_counter()
                    result = attempt(fn, *args)
                    best[key] = min(best[key], time.perf_counter() - start)
                    if isinstance(result, dict):
                        return {"outputs": outputs, "changed": changed, "speed_output": speed_output, "loop_s": 1.0,
                                "scan_s": result}
            if best["loop_s"] >= 5 * best["scan_s"]:
                break
    finally:
        torch.set_num_threads(threads)
    return {"outputs": outputs, "changed": changed, "speed_output": speed_output, **best}


def hillis_steele_variant(a: torch.Tensor, b: torch.Tensor, bug: str) -> torch.Tensor:
    """Hillis-Steele in float64 with one ``bug`` (see the suspects)."""
    a, b = a.double(), b.double()
    L, s = a.shape[-1], 1
    while (2 * s < L) if bug == "early" else (s < L):
        if bug == "roll":  # torch.roll: b_t += a_t b_{t-s mod L} and a_t *= a_{t-s mod L} for every t
            b, a = a * torch.roll(b, s, -1) + b, a * torch.roll(a, s, -1)
            s *= 2
            continue
        if bug == "order":  # (a1, b1) o (a2, b2) = (a1 a2, a1 b2 + b1)
            new_b = a[..., :-s] * b[..., s:] + b[..., :-s]
        else:
            new_a = a[..., s:] * a[..., :-s]
            new_b = (new_a if bug == "a_first" else a[..., s:]) * b[..., :-s] + b[..., s:]
        b = torch.cat([b[..., :s], new_b], dim=-1)
        a = torch.cat([a[..., :s], a[..., s:] * a[..., :-s]], dim=-1)
        s = s + 1 if bug == "plus_one" else 2 * s
    return b


def parallel_suspects(a: torch.Tensor, b: torch.Tensor) -> dict:
    want = ref.python_loop_scan(a.double(), b.double())
    return {
        "this is the exclusive scan (Blelloch's down-sweep gives it): h_t includes b_t, so h_1 = b_1 and h_t = a_t "
        "h_{t-1} + b_t": lambda: F.pad(want[..., :-1], (1, 0)),
        "the first input is dropped: h_1 = b_1, from h_0 = 0": lambda: ref.python_loop_scan(
            a.double(), torch.cat([torch.zeros_like(b[..., :1]), b[..., 1:]], -1).double()),
        "the operator is applied in the wrong order: (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2), so b_t = a_t "
        "b_{t-s} + b_t": lambda: hillis_steele_variant(a, b, "order"),
        "a is updated before b: the step of offset s reads a_t as it was before it (b_t += a_t b_{t-s} with the old "
        "a_t, then a_t *= a_{t-s})": lambda: hillis_steele_variant(a, b, "a_first"),
        "the offsets grow by 1: they double, s = 1, 2, 4, ... while s < L": lambda: hillis_steele_variant(
            a, b, "plus_one"),
        "the last round is missing: offsets s = 1, 2, 4, ... while s < L": lambda: hillis_steele_variant(
            a, b, "early"),
        "the shift wraps around (torch.roll): the first s positions take b from the end of the sequence; shift in "
        "zeros, or leave the first s positions as they are": lambda: hillis_steele_variant(a, b, "roll")}


@define("08.parallel_scan", parallel_inputs, parallel_collect)
def parallel_scan(inputs: dict, out: dict) -> str:
    for case, got, changed in zip(inputs["cases"], out["outputs"], out["changed"], strict=True):
        a, b = case["args"]
        compare(case["what"] + " (vs a Python loop over t in float64)", got, ref.python_loop_scan(a, b), 1e-5,
                "h_t = a_t h_{t-1} + b_t from h_0 = 0, along the last dimension: for s = 1, 2, 4, ... < L, b_t += "
                "a_t b_{t-s} and a_t *= a_{t-s} for t >= s", parallel_suspects(a, b))
        unchanged(case["what"], changed, "make new tensors (torch.cat of the first s positions and the combined "
                  "rest), or work on a.clone() and b.clone()")
    if inputs["speed"] is not None:
        a, b = inputs["speed"]
        compare(f"parallel_scan(a, b) on the timing input {tuple(a.shape)} float32, a in (0.5, 1) (vs a Python loop "
                "over t in float64)", out["speed_output"], ref.python_loop_scan(a.double(), b.double()), 1e-3,
                "in float32 at L = 1024 the product a_1 ... a_t underflows to 0 (0.75^1024 is about 1e-128): a scan "
                "that divides by cumprod(a), or takes exp of a cumsum of log a and its inverse, gives inf or nan. "
                "Combine the pairs (a, b) instead, which only multiplies numbers below 1")
    if raised(out["scan_s"]):
        raise AssertionError(f"parallel_scan on the timing input raised {raised(out['scan_s'])}")
    ratio = out["loop_s"] / max(out["scan_s"], 1e-9)
    if inputs["speed"] is not None and ratio < 5:
        shape = tuple(inputs["speed"][0].shape)
        raise AssertionError(
            f"parallel_scan on {shape} float32 took {1e3 * out['scan_s']:.2f} ms, a Python loop over t "
            f"{1e3 * out['loop_s']:.2f} ms (best of several, one thread): {ratio:.1f}x as fast, not 5x or more. A "
            "log-depth scan takes log2(L) rounds of whole-tensor operations, with no Python loop over t")
    return ("equals a Python-loop scan at L = 1, 2, 7, 13 and 1024, and at (2, 8, 1024) is 5x or more as fast as the "
            "loop, measured in this run")


# ---------------------------------------------------------------- 6. the Mamba block
BLOCK_CASES = [  # (d_model, d_state, d_conv, expand, dt_rank, scan, batch, L)
    (16, 4, 4, 2, "auto", "parallel", 2, 10), (16, 4, 4, 2, "auto", "sequential", 2, 10),
    (24, 3, 3, 1, 5, "parallel", 1, 7), (20, 5, 2, 2, "auto", "sequential", 2, 5)]


def mamba_weights(g: torch.Generator, d_model: int, d_state: int, d_conv: int, expand: int, dt_rank) -> dict:
    """Mamba's mixer weights (``references.mamba_mixer_shapes``): projections scaled like PyTorch's init, a conv bias
    and a D away from 0, A_log around log(1 .. N), dt_proj's bias near softplus^-1(0.01 .. 0.1) + 1."""
    d_inner, R = expand * d_model, ref.mamba_dt_rank(d_model, dt_rank)
    W = (linear_weights("in_proj", d_model, 2 * d_inner, g, bias=False)
         | {"conv1d.weight": torch.randn(d_inner, 1, d_conv, generator=g) / math.sqrt(d_conv),
            "conv1d.bias": 0.2 * torch.randn(d_inner, generator=g)}
         | linear_weights("x_proj", d_inner, R + 2 * d_state, g, bias=False)
         | linear_weights("dt_proj", R, d_inner, g)
         | {"A_log": torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
            + 0.2 * torch.randn(d_inner, d_state, generator=g),
            "D": 1 + 0.5 * torch.randn(d_inner, generator=g)}
         | linear_weights("out_proj", d_inner, d_model, g, bias=False))
    W["dt_proj.bias"] = W["dt_proj.bias"] - 1.0
    assert {k: tuple(v.shape) for k, v in W.items()} == ref.mamba_mixer_shapes(d_model, d_state, d_conv, expand,
                                                                                 dt_rank)
    return W


def block_inputs(seed: int, cases=BLOCK_CASES) -> dict:
    g, out = seeded_generator(seed), []
    for d_model, d_state, d_conv, expand, dt_rank, scan, batch, L in cases:
        config = {"d_model": d_model, "d_state": d_state, "d_conv": d_conv, "expand": expand, "dt_rank": dt_rank}
        out.append({"what": f"MambaBlock({d_model}, d_state={d_state}, d_conv={d_conv}, expand={expand}, "
                            f"dt_rank={dt_rank!r}, scan={scan!r}) on x ({batch}, {L}, {d_model})",
                    "config": config, "scan": scan, "weights": mamba_weights(g, **config),
                    "x": torch.randn(batch, L, d_model, generator=g)})
    return {"cases": out, "forbidden": ["transformers"]}


def block_collect(inputs: dict, MambaBlock) -> dict:
    """Per case: the parameter names and shapes of a fresh block ([name, shape] pairs), the forward with the
    check's weights, and step run token by token from state=None (its outputs, and the states after the last
    token); then, on the same block, two sequences decoded in turn, x and x reversed in time, one token of each at
    a time, each from state=None with the state its own last step returned (their outputs)."""
    out = []
    with PackageCalls(inputs["forbidden"]) as calls, torch.no_grad():
        for case in inputs["cases"]:
            fresh = attempt(MambaBlock, **case["config"], scan=case["scan"])
            shapes = fresh if isinstance(fresh, dict) else [[k, list(v.shape)] for k, v in fresh.state_dict().items()]
            block = attempt(build, MambaBlock, case["weights"], case["what"], **case["config"], scan=case["scan"])
            if isinstance(block, dict):
                out.append({"shapes": shapes, "forward": block, "steps": block, "state": block,
                            "in_turn": [block, block]})
                continue
            x, state, ys = case["x"], None, []
            for t in range(x.shape[1]):
                step = attempt(block.step, x[:, t], state)
                if not isinstance(step, dict) and not (isinstance(step, tuple) and len(step) == 2):
                    step = {"raised": f"TypeError: step returned a {type(step).__name__}, not (y_t, state)"}
                if isinstance(step, dict):
                    ys = state = step
                    break
                y_t, state = step
                ys.append(y_t)
            steps = attempt(torch.stack, ys, dim=1) if isinstance(ys, list) else ys
            state = state if isinstance(state, dict) else attempt(lambda s: tuple(s), state)
            runs = [[x, None, []], [x.flip(1), None, []]]  # [input, its state, its outputs (or what went wrong)]
            for t in range(x.shape[1]):
                for run in runs:
                    if isinstance(run[2], dict):
                        continue
                    step = attempt(block.step, run[0][:, t], run[1])
                    if isinstance(step, tuple) and len(step) == 2:
                        run[1] = step[1]
                        run[2].append(step[0])
                    else:
                        run[2] = step if isinstance(step, dict) else {"raised": "TypeError: step returned a "
                                                                                f"{type(step).__name__}, not (y_t, state)"}
            in_turn = [attempt(torch.stack, run[2], dim=1) if isinstance(run[2], list) else run[2] for run in runs]
            out.append({"shapes": shapes, "forward": attempt(block, x), "steps": steps, "state": state,
                        "in_turn": in_turn})
    return {"cases": out, "called": calls.called}


def mixer_variant(W: dict, config: dict, x: torch.Tensor, bug: str = "") -> torch.Tensor:
    """Mamba's mixer in float64 with one ``bug`` (see the suspects); ``bug`` of :data:`SCAN_BUGS` goes to the scan."""
    W = {k: v.double() for k, v in W.items()}
    d_conv, d_state, L = config["d_conv"], config["d_state"], x.shape[1]
    R = ref.mamba_dt_rank(config["d_model"], config["dt_rank"])
    xs, z = (x.double() @ W["in_proj.weight"].T).chunk(2, dim=-1)  # (B, L, d_inner)
    if bug == "swapped_halves":
        xs, z = z, xs
    weight = W["conv1d.weight"].flip(-1) if bug == "flipped_taps" else W["conv1d.weight"]
    before_conv = xs.transpose(1, 2)
    full = F.conv1d(before_conv, weight, None if bug == "no_conv_bias" else W["conv1d.bias"],
                    padding=d_conv if bug == "lag" else d_conv - 1, groups=weight.shape[0])  # (B, d_inner, ...)
    start = {"centre": (d_conv - 1) // 2, "last": d_conv - 1}.get(bug, 0)
    xs = full[..., start:start + L]
    xs = xs if bug == "no_conv_silu" else F.silu(xs)
    dt, B, C = (xs.transpose(1, 2) @ W["x_proj.weight"].T).split([R, d_state, d_state], dim=-1)
    if bug == "BC_swapped":
        B, C = C, B
    delta = dt @ W["dt_proj.weight"].T + (W["dt_proj.bias"] if bug == "bias_twice" else 0)
    A = {"A_positive": torch.exp(W["A_log"]), "A_minus_log": -W["A_log"]}.get(bug, -torch.exp(W["A_log"]))
    skip = bug == "D_before_conv"  # D x with x before the conv, added here
    y, _ = scan_variant(xs, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), None if skip else W["D"],
                        None if skip else z.transpose(1, 2), None if bug == "no_dt_bias" else W["dt_proj.bias"], True,
                        bug=bug if bug in SCAN_BUGS else "")
    if skip:
        y = (y + W["D"][:, None] * before_conv) * F.silu(z.transpose(1, 2))
    return y.transpose(1, 2) @ W["out_proj.weight"].T


MIXER_BUGS = {
    "swapped_halves": "in_proj's halves are swapped: its first d_inner outputs are x (to the conv), the second z (the "
                      "gate)",
    "centre": "the conv is not causal: it keeps the middle L outputs of the padded conv (padding on both sides), so "
              "position t reads later tokens; keep the first L",
    "last": "the conv keeps the last L outputs of the padded conv, which read later tokens: keep the first L",
    "flipped_taps": "the conv's taps are reversed: conv1d.weight[..., -1] multiplies the newest input x_t (in step, "
                    "the last column of conv_state)",
    "no_conv_bias": "the conv's bias is missing", "no_conv_silu": "SiLU after the conv is missing",
    "BC_swapped": "B and C are swapped: x_proj's output splits as (dt, B, C)",
    "bias_twice": "dt_proj's bias is added twice: delta = dt_proj.weight @ dt, and the bias enters the scan once, as "
                  "delta_bias (softplus(delta + bias))",
    "A_positive": "A = exp(A_log) is positive, so the state grows: A = -exp(A_log)",
    "A_minus_log": "A = -A_log: A_log is the log of -A, so A = -exp(A_log)",
    "lag": "the conv lags by one token: output t reads x_{t-d_conv} .. x_{t-1}, not x_t; pad by d_conv - 1 on the "
           "left (or both sides) and keep the first L outputs",
    "no_dt_bias": "dt_proj's bias is missing: delta = dt_proj.weight @ dt, and the bias enters the scan as delta_bias "
                  "(softplus(delta + bias))",
    "D_before_conv": "D multiplies x before the conv: the skip is D u, with u the conv's output after SiLU (the "
                     "scan's input)",
    "gate_sigmoid": SCAN_BUGS["gate_sigmoid"],
    "exp_A": SCAN_BUGS["exp_A"], "no_softplus": SCAN_BUGS["no_softplus"], "no_D": SCAN_BUGS["no_D"],
    "gate_before": SCAN_BUGS["gate_before"], "gate_no_silu": SCAN_BUGS["gate_no_silu"],
    "zoh_B": SCAN_BUGS["zoh_B"], "previous": SCAN_BUGS["previous"]}
BLOCK_HINT = ("x, z = in_proj(x).chunk(2); x = silu(causal depthwise conv(x) + bias); (dt, B, C) = x_proj(x); delta "
              "= dt_proj.weight @ dt; the scan with A = -exp(A_log), D, z, delta_bias = dt_proj.bias, softplus; "
              "out_proj")


def state_part(what: str, state, i: int, shape: tuple):
    if raised(state):
        raise AssertionError(f"{what} raised {raised(state)}")
    if not isinstance(state, tuple) or len(state) != 2:
        raise AssertionError(f"{what}: the state is (conv_state, ssm_state), got {type(state).__name__}")
    return as_tensor(f"{what}: {('conv_state', 'ssm_state')[i]}", state[i], shape)


@define("08.mamba_block", block_inputs, block_collect)
def mamba_block(inputs: dict, out: dict) -> str:
    forbidden_calls("MambaBlock", out)
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        what, config, W, x = case["what"], case["config"], case["weights"], case["x"]
        want_shapes = ref.mamba_mixer_shapes(**config)
        shapes = got["shapes"] if raised(got["shapes"]) else {k: tuple(v) for k, v in got["shapes"]}
        compare(f"{what}: the parameters' names and shapes", shapes, want_shapes, 0,
                "Mamba's names: in_proj (no bias), conv1d (depthwise, with a bias), x_proj (no bias), dt_proj, A_log, "
                "D, out_proj (no bias); dt_rank 'auto' is ceil(d_model / 16)")
        want = ref.mamba_mixer_reference(W, **config, x=x)
        variants = {MIXER_BUGS[bug]: (lambda bug=bug: mixer_variant(W, config, x, bug)) for bug in MIXER_BUGS}
        suspects = lambda got: {why: (lambda v=v: relative(got, v())) for why, v in variants.items()}
        compare(f"{what}: forward (vs transformers' MambaMixer, torch path)", got["forward"], want, 1e-5, BLOCK_HINT,
                suspects(got["forward"]))
        _, conv_state, ssm_state = ref.mamba_mixer_decode_reference(W, **config, x=x)
        compare(f"{what}: step, token by token from state=None, against the full forward", got["steps"], want, 1e-5,
                "step: roll conv_state left and write x_t in its last column; the conv is the dot product of "
                "conv_state with conv1d.weight[:, 0] plus the bias; then the scan's one step from ssm_state",
                suspects(got["steps"]))
        step = f"{what}: step's state after {x.shape[1]} tokens"
        compare(f"{step}: ssm_state (vs transformers' MambaMixer's cache)",
                state_part(step, got["state"], 1, ssm_state.shape), ssm_state, 1e-5,
                "ssm_state (B, d_inner, d_state) is h_t after the token")
        compare(f"{step}: conv_state (vs transformers' MambaMixer's cache)",
                state_part(step, got["state"], 0, conv_state.shape), conv_state, 1e-5,
                "conv_state (B, d_inner, d_conv) holds the last d_conv inputs of the conv (in_proj's x half), the "
                "newest in the last column", {"conv_state holds the newest input in its first column: roll it left "
                                              "and write x_t in the last column": conv_state.flip(-1)})
        wants = (lambda: want, lambda: ref.mamba_mixer_reference(W, **config, x=x.flip(1)))
        for seq, got_seq, want_seq in zip(("x", "x reversed in time"), got["in_turn"], wants, strict=True):
            compare(f"{what}: step, decoding two sequences in turn (x and x reversed in time, one token of each at a "
                    f"time, each from state=None and then the state its own last step returned): the outputs for "
                    f"{seq}", got_seq, want_seq(), 1e-5,
                    "step must compute from the state it is given (zeros for state=None) and return the new one, "
                    "keeping nothing between calls: a state kept on the module (in self) mixes up the sequences")
    return ("has Mamba's parameter names and shapes, and equals transformers' MambaMixer (torch path) with both scans "
            "and dt_rank 'auto' or an int; step, token by token from state=None, equals it, and its states equal "
            "transformers' cache")


# ---------------------------------------------------------------- 7. Mamba-2's chunked SSD
SSD_CASES = [  # (batch, L, H, P, G, N, chunk_size, reference)
    (2, 13, 4, 3, 1, 5, 4, "sequential"), (1, 13, 4, 2, 2, 3, 4, "transformers"), (2, 8, 2, 3, 1, 4, 4, "selective"),
    (1, 5, 2, 2, 1, 3, 1, "sequential"), (1, 5, 3, 2, 3, 2, 16, "transformers"), (2, 12, 4, 2, 2, 3, 5, "sequential")]
SSD_REFERENCES = {"sequential": "a float64 loop over positions", "transformers": "transformers' mamba2_chunk_scan",
                  "selective": "transformers' Mamba-1 scan on the same scalar-A problem"}


def ssd_inputs(seed: int, cases=SSD_CASES) -> dict:
    """float32 inputs: dt in (0.02, 0.6), A in (-2, -0.2), as in a real model."""
    g, out = seeded_generator(seed), []
    for batch, L, H, P, G, N, chunk, reference in cases:
        args = [torch.randn(batch, L, H, P, generator=g), uniform(g, 0.02, 0.6, batch, L, H), -uniform(g, 0.2, 2.0, H),
                torch.randn(batch, L, G, N, generator=g), torch.randn(batch, L, G, N, generator=g), chunk]
        groups = f"G = {G} group{'s' if G > 1 else ''}"
        out.append({"what": f"ssd_chunked(x ({batch}, {L}, {H}, {P}), B and C with {groups} of N = {N}, "
                            f"chunk_size={chunk})", "args": args, "reference": reference})
    return {"cases": out, "forbidden": ["transformers"]}


def ssd_collect(inputs: dict, ssd_chunked) -> dict:
    """Each case's output (of copies), the names of the tensors the call changed in place ("" if none), and the
    packages of ``inputs["forbidden"]`` that the student's code called."""
    outputs, changed = [], []
    with PackageCalls(inputs["forbidden"]) as calls, torch.no_grad():
        for case in inputs["cases"]:
            copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in case["args"]]
            outputs.append(attempt(ssd_chunked, *copies))
            changed.append(", ".join(name for name, t, given in zip(("x", "dt", "A", "B", "C"), copies, case["args"])
                                     if not (t.shape == given.shape and torch.equal(t, given))))
    return {"outputs": outputs, "changed": changed, "called": calls.called}


def ssd_variant(x, dt, A, B, C, chunk: int, bug: str) -> torch.Tensor:
    """The SSM of ``references.ssd_sequential`` in float64 with one ``bug`` (see the suspects)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, L, H, P = x.shape
    G = B.shape[2]
    group = torch.arange(H) % G if bug == "modulo" else torch.arange(H) // (H // G)
    B, C = B[:, :, group], C[:, :, group]  # (batch, L, H, N)
    if bug == "BC_swapped":
        B, C = C, B
    h, ys = torch.zeros(batch, H, P, B.shape[-1], dtype=torch.float64), []
    for t in range(L):
        if bug == "reset" and t % chunk == 0:
            h = torch.zeros_like(h)
        decay = torch.exp(A if bug == "exp_A" else dt[:, t] * A)[..., None, None]
        new = ((1 if bug == "no_dt" else dt[:, t, :, None]) * x[:, t])[..., None] * B[:, t, :, None, :]
        h = decay * h + new
        ys.append(torch.einsum("bhpn,bhn->bhp", h - new if bug == "diagonal" else h, C[:, t]))
    return torch.stack(ys, dim=1)


def ssd_chunk_variant(x, dt, A, B, C, chunk: int, bug: str) -> torch.Tensor:
    """Mamba-2's chunked form in float64 with one ``bug`` that only chunks show (see the suspects): "future" (the decay
    matrices, within chunks and across them, 1 above their diagonal: exp of segment sums that are 0 there, not -inf),
    "undecayed" (the states of earlier chunks summed without their decay)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, L, H, P = x.shape
    B, C = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (B, C))  # (batch, L, H, N)
    parts = [slice(start, min(start + chunk, L)) for start in range(0, L, chunk)]
    X = dt[..., None] * x
    cums = [(dt[:, part] * A).cumsum(1) for part in parts]  # (batch, l, H) each
    left = [torch.einsum("bshn,bsh,bshp->bhpn", B[:, part], torch.exp(cum[:, -1:] - cum), X[:, part])
            for part, cum in zip(parts, cums)]  # the state each chunk leaves, from zero
    h, ys = torch.zeros_like(left[0]), []
    for c, (part, cum) in enumerate(zip(parts, cums)):
        start = h + sum(left[c:]) if bug == "future" else h  # later chunks' states, undecayed
        l = cum.shape[1]
        below = torch.ones(l, l, dtype=torch.bool).tril()[None, :, :, None]
        decay = torch.where(below, torch.exp(cum[:, :, None] - cum[:, None]), 1.0 if bug == "future" else 0.0)
        ys.append(torch.einsum("bthn,bshn,btsh,bshp->bthp", C[:, part], B[:, part], decay, X[:, part])
                  + torch.einsum("bthn,bhpn,bth->bthp", C[:, part], start, torch.exp(cum)))
        h = (h if bug == "undecayed" else torch.exp(cum[:, -1])[..., None, None] * h) + left[c]
    return torch.cat(ys, dim=1)


SSD_CHUNK_BUGS = {
    "future": "the decay matrix L is 1 above its diagonal, so y_t reads later inputs (of its chunk, and the states of "
              "later chunks): segment sums are -inf above the diagonal (exp -> 0), within chunks and across them",
    "undecayed": "the states of earlier chunks reach a chunk without their decay: chunk c starts from the state chunk "
                 "c - 1 started from, times exp(the sum of dt A over chunk c - 1), plus the state chunk c - 1 leaves"}
SSD_BUGS = {
    "reset": "each chunk starts from a zero state: it forgets the inter-chunk state (the states that the chunks before "
             "it leave, decayed, are its starting state)",
    "modulo": "head h reads group h % G: heads share their group contiguously, h // (H / G) (repeat_interleave)",
    "exp_A": "the decay is exp(A): it is exp(dt A)",
    "no_dt": "the input lacks its dt: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T",
    "diagonal": "the input at t does not reach y_t: the decay matrix L has exp(0) = 1 on its diagonal (segment sums "
                "are 0 there, -inf only above it)",
    "BC_swapped": "B and C are swapped: the state takes x B^T, the output reads h C"}
SSD_HINT = ("pad L to whole chunks with zeros (L need not be a multiple of chunk_size); head h uses group h // (H / "
            "G); per chunk the masked form (C B^T * L) (dt x), the state each chunk leaves, a recurrence over "
            "chunks, and each chunk's starting state decayed into its outputs")


@define("08.ssd_chunked", ssd_inputs, ssd_collect)
def ssd_chunked(inputs: dict, out: dict) -> str:
    forbidden_calls("ssd_chunked", out)
    for case, got, changed in zip(inputs["cases"], out["outputs"], out["changed"], strict=True):
        x, dt, A, B, C, chunk = case["args"]
        how = case["reference"]
        want = {"sequential": lambda: ref.ssd_sequential(x, dt, A, B, C),
                "transformers": lambda: ref.ssd_reference(x, dt, A, B, C, chunk),
                "selective": lambda: ref.ssd_via_selective_scan(x, dt, A, B, C)}[how]()
        scale = max(1.0, want.abs().max().item()) if how == "transformers" else 1.0  # float32 inside: relative
        got = got / scale if isinstance(got, torch.Tensor) else got
        applies = {"reset": chunk < x.shape[1], "modulo": 1 < B.shape[2] < x.shape[2]}  # else the same as right
        suspects = {SSD_BUGS[bug]: (lambda bug=bug, g=got: relative(g, ssd_variant(x, dt, A, B, C, chunk, bug) / scale))
                    for bug in SSD_BUGS if applies.get(bug, True)}
        suspects |= {SSD_CHUNK_BUGS[bug]: (lambda bug=bug, g=got: relative(
            g, ssd_chunk_variant(x, dt, A, B, C, chunk, bug) / scale)) for bug in SSD_CHUNK_BUGS}
        compare(f"{case['what']} (vs {SSD_REFERENCES[how]}{', relative' if scale != 1 else ''})", got, want / scale,
                2e-5 if how == "transformers" else 1e-5, SSD_HINT, suspects)
        unchanged(case["what"], changed, "make new tensors (x * dt[..., None], not x *= ...)")
    return ("equals a float64 loop, transformers' mamba2_chunk_scan and Mamba-1's scan on the same scalar-A problem, "
            "with L a multiple of chunk_size or not, chunk_size 1 and > L, and 1, 2 or H groups")
