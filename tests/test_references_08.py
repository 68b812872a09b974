"""The references of Lab 8's checks (state space models) follow the code they stand for: the zero-order hold by
Van Loan's block matrix exponential, S4D's Vandermonde kernel, transformers' pure-PyTorch ``mamba_selective_scan``
(Mamba's ``selective_scan_ref`` semantics), transformers' ``MambaMixer`` torch path, transformers'
``mamba2_chunk_scan`` (Mamba-2's SSD) and the inference memory of published configurations. Each is checked here
against a second, independent computation, mostly a sequential float64 loop; the notes are in
``tests/lab08_reference_notes.md``."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from labkit.checks import references as ref

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def rand(g, *shape, low=0.0, high=1.0):
    return low + (high - low) * torch.rand(*shape, generator=g, dtype=F64)


# ---------------------------------------------------------------- the sequential scan
def test_python_loop_scan():
    """h_t = a_t h_{t-1} + b_t with h_0 = 0: by hand, at L = 1, against the closed form
    h_t = sum_{s <= t} (prod_{s < k <= t} a_k) b_s, with broadcasting, and in the inputs' dtype."""
    a = torch.full((5,), 2.0, dtype=F64)
    assert ref.python_loop_scan(a, torch.ones(5, dtype=F64)).tolist() == [1.0, 3.0, 7.0, 15.0, 31.0]
    g = gen(0)
    for L in (1, 2, 7, 64):
        a, b = rand(g, 2, 3, L, low=0.5, high=1.0), randn(g, 2, 3, L)
        logs = torch.log(a).cumsum(-1)  # prod_{s < k <= t} a_k = exp(logs_t - logs_s)
        weights = torch.exp(logs[..., :, None] - logs[..., None, :]).tril()  # [t, s]
        torch.testing.assert_close(ref.python_loop_scan(a, b), (weights * b[..., None, :]).sum(-1),
                                   atol=1e-12, rtol=0)
    h = ref.python_loop_scan(torch.tensor(0.5), torch.ones(2, 4))  # a broadcast over (2, 4)
    assert h.dtype == torch.float32 and h.shape == (2, 4)
    torch.testing.assert_close(h[0], torch.tensor([1.0, 1.5, 1.75, 1.875]))


# ---------------------------------------------------------------- discretisation and the LTI modes
def series(M: torch.Tensor, terms: int = 25, shift: int = 0) -> torch.Tensor:
    """sum_k M^k / (k + shift)!: exp(M) for shift 0, (exp(M) - I) M^-1 for shift 1, by its Taylor series."""
    total, power = torch.zeros_like(M), torch.eye(M.shape[0], dtype=M.dtype)
    for k in range(terms):
        total = total + power / float(math.factorial(k + shift))
        power = power @ M
    return total


def test_zoh_block_matrix_against_series_and_closed_form():
    """Dense A: A_bar = exp(dt A) and B_bar = (sum_k (dt A)^k / (k+1)!) dt B, the Taylor series of the integral,
    which also equals (dt A)^-1 (exp(dt A) - I) dt B for an invertible A. Diagonal A, real (a zero entry
    included, whose limit is dt B) and complex (S4D-Lin: -1/2 + i pi n): the block form equals the closed form."""
    g, dt = gen(1), 0.3
    A = randn(g, 4, 4, scale=0.7) - torch.eye(4, dtype=F64)
    B = randn(g, 4, 2)
    A_bar, B_bar = ref.zoh_reference(A, B, dt)
    torch.testing.assert_close(A_bar, series(dt * A), atol=1e-13, rtol=0)
    torch.testing.assert_close(B_bar, series(dt * A, shift=1) @ (dt * B), atol=1e-13, rtol=0)
    closed = torch.linalg.solve(dt * A, (A_bar - torch.eye(4, dtype=F64)) @ (dt * B))
    torch.testing.assert_close(B_bar, closed, atol=1e-12, rtol=0)
    # diagonal, real with a zero, and complex
    A = torch.tensor([-0.5, -2.0, 0.0, -7.0], dtype=F64)
    B = randn(g, 4)
    for got, want in zip(ref.zoh_reference(A, B, dt), ref.zoh_diagonal(A, B, dt)):
        torch.testing.assert_close(got, want, atol=1e-14, rtol=0)
    assert ref.zoh_diagonal(A, B, dt)[1][2] == dt * B[2]
    A = torch.complex(torch.full((6,), -0.5, dtype=F64), math.pi * torch.arange(6, dtype=F64))
    A_bar, B_bar = ref.zoh_reference(A, B[:1].expand(6), dt)
    assert A_bar.dtype == torch.complex128 and A_bar.shape == (6,)
    for got, want in zip((A_bar, B_bar), ref.zoh_diagonal(A, B[:1].expand(6), dt)):
        torch.testing.assert_close(got, want, atol=1e-14, rtol=0)
    # small dt A: expm1 keeps the relative accuracy; the Euler B_bar = dt B is the first-order term
    A_small = torch.tensor([-1e-9], dtype=F64)
    assert ref.zoh_diagonal(A_small, torch.ones(1, dtype=F64), 1.0)[1].item() == pytest.approx(1 - 5e-10, rel=1e-15)


def test_lti_recurrent_equals_convolutional_mode():
    """The recurrence equals the causal convolution with the Vandermonde kernel, direct and by an FFT over 2L
    points, for real and complex A; a complex system of N/2 modes equals its conjugate-pair expansion to N modes
    (summed, with no 2 Re); an FFT over L points (circular) does not."""
    g, L, dt = gen(2), 33, 0.1
    u = randn(g, L)
    A_real = -rand(g, 6, low=0.1, high=3.0)
    A_complex = torch.complex(torch.full((3,), -0.5, dtype=F64), math.pi * torch.arange(3, dtype=F64))
    B_real, C_real = randn(g, 6), randn(g, 6)
    for A in (A_real, A_complex):
        B = randn(g, 3).to(A.dtype) if A.is_complex() else B_real
        C = torch.complex(randn(g, 3), randn(g, 3)) if A.is_complex() else C_real
        A_bar, B_bar = ref.zoh_diagonal(A, B, dt)
        y = ref.lti_recurrent_reference(u, A_bar, B_bar, C)
        K = ref.s4d_kernel_reference(A, B, C, dt, L)
        assert y.dtype == K.dtype == F64
        torch.testing.assert_close(ref.causal_convolution_reference(u, K), y, atol=1e-12, rtol=0)
        n = 2 * L
        fft = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)[:L]
        torch.testing.assert_close(fft, y, atol=1e-12, rtol=0)
        circular = torch.fft.irfft(torch.fft.rfft(u, n=L) * torch.fft.rfft(K, n=L), n=L)
        assert (circular - y).abs().max() > 1e-3
        if A.is_complex():
            pairs = [torch.cat([t, t.conj()]) for t in (A_bar, B_bar, C)]
            x, ys = torch.zeros(6, dtype=torch.complex128), []
            for u_k in u:
                x = pairs[0] * x + pairs[1] * u_k
                ys.append((pairs[2] * x).sum())
            expanded = torch.stack(ys)
            assert expanded.imag.abs().max() < 1e-12
            torch.testing.assert_close(expanded.real, y, atol=1e-12, rtol=0)
            # S4D's own code (state-spaces/s4, models/s4/s4d.py): C' = C B (exp(dtA) - 1) / A, K = 2 Re(C' V)
            dtA = dt * A
            s4d = 2 * torch.einsum("n,nl->l", C * B * (torch.exp(dtA) - 1) / A,
                                   torch.exp(dtA[:, None] * torch.arange(L))).real
            torch.testing.assert_close(K, s4d, atol=1e-12, rtol=0)
    assert ref.lti_recurrent_reference(u[:1], A_bar, B_bar, C).shape == (1,)
    # the planted bug "exp(A) instead of exp(dt A)" changes the kernel
    wrong = ref.lti_kernel_reference(torch.exp(A_real), ref.zoh_diagonal(A_real, B_real, dt)[1], C_real, L)
    assert (wrong - ref.s4d_kernel_reference(A_real, B_real, C_real, dt, L)).abs().max() > 1e-2


# ---------------------------------------------------------------- the selective scan (Mamba)
def selective_scan_ref_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba's ``selective_scan_ref`` (state-spaces/mamba, ``mamba_ssm/ops/selective_scan_interface.py``
    l. 127-193) in the case it shares with transformers (real A (D, N), B and C (B, N, L)), rewritten in float64
    where the original casts to float32. Returns (out, last_state)."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = A.new_zeros((u.shape[0], A.shape[0], A.shape[1]))
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    out = torch.stack(ys, dim=2)
    out = out if D is None else out + u * D[:, None]
    return (out if z is None else out * F.silu(z)), x


def scan_case(seed: int, L: int, batch: int = 2, d: int = 5, n: int = 3) -> dict:
    g = gen(seed)
    return {"u": randn(g, batch, d, L), "delta": randn(g, batch, d, L, scale=0.5) + 0.3,
            "A": -torch.exp(randn(g, d, n, scale=0.5)), "B": randn(g, batch, n, L), "C": randn(g, batch, n, L),
            "D": randn(g, d), "z": randn(g, batch, d, L), "delta_bias": randn(g, d, scale=0.3)}


FLAGS = [dict(), dict(D=1), dict(z=1), dict(delta_bias=1), dict(delta_softplus=True),
         dict(D=1, z=1, delta_bias=1, delta_softplus=True), dict(D=1, delta_softplus=True), dict(z=1, delta_bias=1)]


@pytest.mark.parametrize("L", [1, 2, 7])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "+".join(f) or "plain")
def test_selective_scan_reference_is_selective_scan_ref(L, flags):
    """Output and last state equal the float64 ``selective_scan_ref`` with and without D, z, delta_bias and
    softplus. The softplus-free cases use positive delta (as a caller would); the loop is sequential float64."""
    case = scan_case(10 * L + len(flags), L)
    if not flags.get("delta_softplus"):
        case["delta"] = case["delta"].abs() + 0.05
    kwargs = {k: case[k] for k in ("D", "z", "delta_bias") if k in flags}
    kwargs["delta_softplus"] = bool(flags.get("delta_softplus"))
    args = [case[k] for k in ("u", "delta", "A", "B", "C")]
    y, state = ref.selective_scan_reference(*args, **kwargs, return_last_state=True)
    want_y, want_state = selective_scan_ref_f64(*args, **kwargs)
    assert y.dtype == state.dtype == F64 and y.shape == (2, 5, L) and state.shape == (2, 5, 3)
    # transformers rounds B and u to float32 before delta * B * u: agreement to about 1e-7 relative ...
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, want_state, atol=1e-6, rtol=1e-6)
    # ... and to float64 rounding once B and u are float32 numbers to begin with
    rounded = [case["u"].float().double(), case["delta"], case["A"], case["B"].float().double(), case["C"]]
    if not flags.get("delta_softplus"):
        rounded[1] = case["delta"].abs() + 0.05
    y32, state32 = ref.selective_scan_reference(*rounded, **kwargs, return_last_state=True)
    want_y32, want_state32 = selective_scan_ref_f64(*rounded, **kwargs)
    torch.testing.assert_close(y32, want_y32, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state32, want_state32, atol=1e-12, rtol=1e-12)
    assert torch.equal(ref.selective_scan_reference(*args, **kwargs), y)  # return_last_state=False: y only


def test_selective_scan_reference_catches_the_planted_bugs_and_refuses_other_layouts():
    """Each planted bug of the issue moves the output far beyond 1e-5; complex A, a constant B (D, N) and grouped B
    (B, G, N, L), which selective_scan_ref accepts, are refused (transformers' torch path mishandles them)."""
    c = scan_case(99, 16)
    args = [c[k] for k in ("u", "delta", "A", "B", "C")]
    full = dict(D=c["D"], z=c["z"], delta_bias=c["delta_bias"], delta_softplus=True)
    y = ref.selective_scan_reference(*args, **full)
    bugs = {
        "exp(A) instead of exp(dt A)": None,
        "softplus missing": ref.selective_scan_reference(*args, **(full | dict(delta_softplus=False))),
        "D missing": ref.selective_scan_reference(*args, **(full | dict(D=None))),
        "gate before the scan": ref.selective_scan_reference(args[0] * F.silu(c["z"]), *args[1:], D=c["D"],
                                                             delta_bias=c["delta_bias"], delta_softplus=True),
    }
    delta = F.softplus(c["delta"] + c["delta_bias"][:, None])
    # exp(A): deltaA = exp(A) whatever delta, written as the sequential loop with that one change
    x, ys = torch.zeros(2, 5, 3, dtype=F64), []
    for t in range(16):
        x = torch.exp(c["A"]) * x + delta[:, :, t, None] * c["B"][:, None, :, t] * c["u"][:, :, t, None]
        ys.append((x * c["C"][:, None, :, t]).sum(-1))
    bugs["exp(A) instead of exp(dt A)"] = (torch.stack(ys, -1) + c["D"][:, None] * c["u"]) * F.silu(c["z"])
    for name, wrong in bugs.items():
        assert (wrong - y).abs().max() > 1e-3, name
    with pytest.raises(ValueError):
        ref.selective_scan_reference(*args[:2], args[2].to(torch.complex128), *args[3:])
    with pytest.raises(ValueError):
        ref.selective_scan_reference(*args[:3], randn(gen(0), 5, 3), randn(gen(0), 5, 3))
    with pytest.raises(ValueError):
        ref.selective_scan_reference(*args[:3], args[3][:, None], args[4][:, None])


def test_the_torch_paths_are_the_functions_written_in_transformers():
    scan = ref._torch_path("mamba", "mamba_selective_scan")
    assert list(inspect.signature(scan).parameters)[:10] == [
        "hidden_states", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state"]
    assert scan is ref.hf("mamba", "mamba_selective_scan").__wrapped__
    ssd = ref._torch_path("mamba2", "mamba2_chunk_scan")
    assert list(inspect.signature(ssd).parameters)[:12] == [
        "hidden_states", "dt", "A", "B", "C", "chunk_size", "D", "dt_bias", "initial_states", "dt_softplus",
        "dt_limit", "return_final_states"]
    assert inspect.signature(ssd).parameters["dt_limit"].default == (0.0, math.inf)


# ---------------------------------------------------------------- the Mamba block
def mamba_forward_f64(w: dict, x: torch.Tensor, d_state: int, d_conv: int, dt_rank: int, causal: bool = True,
                      return_states: bool = False):
    """mamba_ssm's ``Mamba.forward`` slow path (``mamba_ssm/modules/mamba_simple.py`` l. 119-206, no cache), in
    float64, written with explicit loops for the conv (tap k reads position t - (d_conv - 1) + k) and the scan.
    ``causal=False`` is the planted bug: the conv's padding split over both sides. ``return_states`` adds the
    conv's inputs (batch, L, d_inner) and the last state h_L (batch, d_inner, d_state)."""
    w = {k: v.double() for k, v in w.items()}
    batch, L, _ = x.shape
    xz = x @ w["in_proj.weight"].T + w.get("in_proj.bias", 0)
    u, z = xz.chunk(2, dim=-1)  # (batch, L, d_inner)
    conv_inputs = u
    kernel = w["conv1d.weight"][:, 0]  # (d_inner, d_conv)
    shift = d_conv - 1 if causal else (d_conv - 1) // 2
    conv = torch.zeros_like(u) + w.get("conv1d.bias", 0)
    for t in range(L):
        for k in range(d_conv):
            s = t - shift + k
            if 0 <= s < L:
                conv[:, t] += kernel[:, k] * u[:, s]
    u = F.silu(conv)
    dt, B, C = torch.split(u @ w["x_proj.weight"].T, [dt_rank, d_state, d_state], dim=-1)
    delta = F.softplus(dt @ w["dt_proj.weight"].T + w["dt_proj.bias"])  # (batch, L, d_inner)
    A = -torch.exp(w["A_log"])
    h = torch.zeros(batch, A.shape[0], d_state, dtype=F64)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + w["D"] * u[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    out = y @ w["out_proj.weight"].T + w.get("out_proj.bias", 0)
    return (out, conv_inputs, h) if return_states else out


def mixer_weights(seed: int, d_model, d_state, d_conv, expand, dt_rank="auto", bias=False, conv_bias=True):
    g = gen(seed)
    shapes = ref.mamba_mixer_shapes(d_model, d_state, d_conv, expand, dt_rank, bias=bias, conv_bias=conv_bias)
    w = {name: randn(g, *shape, scale=0.4).float() for name, shape in shapes.items()}
    w["A_log"] = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(expand * d_model, -1) \
        + randn(g, expand * d_model, d_state, scale=0.2).float()
    w["dt_proj.bias"] = torch.log(torch.expm1(rand(g, expand * d_model, low=0.01, high=0.2))).float()
    return w


@pytest.mark.parametrize("d_model,d_state,d_conv,expand,dt_rank,bias,conv_bias,L", [
    (16, 4, 4, 2, "auto", False, True, 9),
    (16, 4, 4, 2, "auto", False, True, 1),
    (40, 3, 3, 1, 5, True, False, 6),
    (24, 8, 2, 2, "auto", True, True, 4),
])
def test_mamba_mixer_reference_equals_mamba_simple(d_model, d_state, d_conv, expand, dt_rank, bias, conv_bias, L):
    """transformers' MambaMixer with the weights copied in equals mamba_simple's forward written in float64, for
    dt_rank "auto" (ceil(d_model / 16)) and explicit, with and without the in/out and conv biases, L = 1 included;
    a non-causal conv and a missing softplus are both far off."""
    rank = ref.mamba_dt_rank(d_model, dt_rank)
    assert rank == (math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank)
    w = mixer_weights(d_model + L, d_model, d_state, d_conv, expand, dt_rank, bias, conv_bias)
    x = randn(gen(L), 2, L, d_model).float()
    got = ref.mamba_mixer_reference(w, d_model, d_state, d_conv, expand, dt_rank, x)
    want = mamba_forward_f64(w, x.double(), d_state, d_conv, rank)
    assert got.dtype == F64 and got.shape == (2, L, d_model)
    # A = -exp(A_log.float()), D, dt_proj.bias, B and u pass through float32 inside transformers
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)
    if L > 1 and d_conv > 1:
        assert (mamba_forward_f64(w, x.double(), d_state, d_conv, rank, causal=False) - got).abs().max() > 1e-3
    # causality: the output up to t does not see the input after t
    if L > 2:
        changed = x.clone()
        changed[:, 2:] = randn(gen(7), 2, L - 2, d_model).float()
        again = ref.mamba_mixer_reference(w, d_model, d_state, d_conv, expand, dt_rank, changed)
        assert torch.equal(again[:, :2], got[:, :2]) and (again[:, 2:] - got[:, 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("L,prefill,d_conv", [(7, 0, 4), (7, 3, 4), (2, 0, 4), (5, 5, 3)])
def test_mamba_mixer_decode_reference(L, prefill, d_conv):
    """Token-by-token decoding through transformers' cache equals the float64 forward, and its states are the last
    d_conv inputs of the conv (zeros before the start, when L < d_conv) and the scan's last state."""
    w = mixer_weights(L + prefill, 16, 4, d_conv, 2)
    x = randn(gen(prefill), 2, L, 16)
    y, conv_state, ssm_state = ref.mamba_mixer_decode_reference(w, 16, 4, d_conv, 2, "auto", x, prefill=prefill)
    want, conv_inputs, h = mamba_forward_f64(w, x, 4, d_conv, 1, return_states=True)
    assert conv_state.shape == (2, 32, d_conv) and ssm_state.shape == (2, 32, 4) and y.dtype == F64
    torch.testing.assert_close(y, want, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(conv_state, F.pad(conv_inputs.transpose(1, 2), (d_conv, 0))[..., -d_conv:],
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(ssm_state, h, atol=2e-6, rtol=1e-6)
    full = ref.mamba_mixer_reference(w, 16, 4, d_conv, 2, "auto", x)
    torch.testing.assert_close(y[:, :max(1, prefill)], full[:, :max(1, prefill)], atol=1e-12, rtol=0)


def test_mamba_mixer_names_and_shapes_are_transformers():
    """The state dict of a MambaMixer built from ``mamba_config`` has exactly the names and shapes of
    ``mamba_mixer_shapes``; a missing, extra or misshapen weight is refused (strict loading)."""
    for kwargs in (dict(), dict(use_bias=True), dict(use_conv_bias=False)):
        config = ref.mamba_config(40, 5, 3, 2, **kwargs)
        mixer = ref.hf("mamba", "MambaMixer")(config, layer_idx=0)
        shapes = ref.mamba_mixer_shapes(40, 5, 3, 2, bias=kwargs.get("use_bias", False),
                                        conv_bias=kwargs.get("use_conv_bias", True))
        assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == shapes
    assert config.time_step_rank == 3 and ref.mamba_dt_rank(2560) == 160
    w = mixer_weights(0, 16, 4, 4, 2)
    x = torch.zeros(1, 2, 16)
    with pytest.raises(RuntimeError):
        ref.mamba_mixer_reference({k: v for k, v in w.items() if k != "D"}, 16, 4, 4, 2, "auto", x)
    with pytest.raises(RuntimeError):
        ref.mamba_mixer_reference(w | {"A_log": w["A_log"][:, :3]}, 16, 4, 4, 2, "auto", x)
    with pytest.raises(ValueError):
        ref.mamba_mixer_reference(w | {"in_proj.bias": torch.zeros(64)}, 16, 4, 4, 2, "auto", x)


# ---------------------------------------------------------------- Mamba-2's SSD
def ssd_case(seed: int, L: int, H: int = 4, P: int = 3, G: int = 2, N: int = 5, batch: int = 2) -> dict:
    g = gen(seed)
    return {"x": randn(g, batch, L, H, P), "dt": rand(g, batch, L, H, low=0.02, high=0.6),
            "A": -rand(g, H, low=0.2, high=2.0), "B": randn(g, batch, L, G, N), "C": randn(g, batch, L, G, N)}


@pytest.mark.parametrize("L,chunk,G", [(1, 4, 2), (8, 4, 2), (13, 4, 1), (13, 4, 2), (5, 16, 4), (20, 1, 2)])
def test_ssd_reference_equals_the_sequential_ssm(L, chunk, G):
    """transformers' chunked SSD equals the float64 loop, L a multiple of the chunk or not, one chunk larger than
    L, chunks of 1, 1 to 4 groups; the final state too (the padded steps leave it alone), and the same problem
    run through Mamba-1's selective scan per channel. Tolerance: transformers computes in float32."""
    c = ssd_case(L * 10 + chunk + G, L, G=G)
    args = [c[k] for k in ("x", "dt", "A", "B", "C")]
    y, state = ref.ssd_reference(*args, chunk, return_final_state=True)
    want_y, want_state = ref.ssd_sequential(*args, return_final_state=True)
    assert y.dtype == state.dtype == F64 and y.shape == (2, L, 4, 3) and state.shape == (2, 4, 3, 5)
    torch.testing.assert_close(y, want_y, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(state, want_state, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ref.ssd_via_selective_scan(*args), want_y, atol=1e-6, rtol=1e-6)
    assert torch.equal(ref.ssd_reference(*args, chunk), y)


def test_ssd_sequential_by_its_definition():
    """One head, P = N = 1: h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t, y_t = c_t h_t, against a scalar loop; the
    head's group is h // (H / G) (contiguous heads share a group)."""
    c = ssd_case(3, 6, H=4, P=1, G=2, N=1, batch=1)
    y = ref.ssd_sequential(*(c[k] for k in ("x", "dt", "A", "B", "C")))
    for head in range(4):
        group, h, ys = head // 2, 0.0, []
        for t in range(6):
            dt = c["dt"][0, t, head].item()
            h = math.exp(dt * c["A"][head].item()) * h + dt * c["x"][0, t, head, 0].item() * c["B"][0, t, group, 0]
            ys.append((c["C"][0, t, group, 0] * h).item())
        torch.testing.assert_close(y[0, :, head, 0], torch.tensor(ys, dtype=F64), atol=1e-14, rtol=0)


def test_ssd_reference_options_and_the_planted_bug():
    """D adds D_h x_t, an initial state is carried in, and forgetting the inter-chunk state (each chunk restarted
    from zero, the planted bug) is far off. transformers' default dt_limit (0, inf) would clamp a negative dt to 0;
    the reference does not clamp."""
    c = ssd_case(5, 11)
    args = [c[k] for k in ("x", "dt", "A", "B", "C")]
    D, h0 = randn(gen(6), 4), randn(gen(7), 2, 4, 3, 5)
    y, state = ref.ssd_reference(*args, 4, D=D, initial_state=h0, return_final_state=True)
    want_y, want_state = ref.ssd_sequential(*args, D=D, initial_state=h0, return_final_state=True)
    torch.testing.assert_close(y, want_y, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(state, want_state, atol=2e-5, rtol=2e-5)
    forgetful = torch.cat([ref.ssd_sequential(*(t[:, s:s + 4] for t in args[:2]), args[2],
                                              *(t[:, s:s + 4] for t in args[3:])) for s in range(0, 11, 4)], dim=1)
    assert (forgetful - ref.ssd_sequential(*args)).abs().max() > 1e-2
    negative = [args[0], args[1] - 0.3, *args[2:]]
    torch.testing.assert_close(ref.ssd_reference(*negative, 4), ref.ssd_sequential(*negative), atol=2e-5, rtol=2e-5)
    clamped = ref._torch_path("mamba2", "mamba2_chunk_scan")(*negative[:5], 4)
    torch.testing.assert_close(clamped.double(), ref.ssd_sequential(negative[0], negative[1].clamp(min=0),
                                                                    *negative[2:]), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- inference memory
def test_memory_of_the_published_configurations():
    """Mamba-2.8B's state and Pythia-2.8B's KV cache, in bytes, at 2 bytes an element."""
    state = ref.mamba_state_bytes(ref.MAMBA_2_8B)
    assert state == 64 * 5120 * (4 + 16) * 2 == 13_107_200
    assert ref.mamba_state_bytes(ref.MAMBA_2_8B, batch=3, bytes_per_element=4) == 6 * state
    per_token = ref.kv_cache_bytes_per_token(ref.PYTHIA_2_8B)
    assert per_token == 2 * 32 * 2560 * 2 == 327_680
    assert ref.PYTHIA_2_8B["n_heads"] * ref.PYTHIA_2_8B["head_dim"] == ref.PYTHIA_2_8B["d_model"]
    assert ref.kv_cache_bytes(ref.PYTHIA_2_8B, 8192) == 2_684_354_560 == int(2.5 * 2**30)
    assert ref.kv_cache_bytes(ref.PYTHIA_2_8B, 131072) == 42_949_672_960 == 40 * 2**30
    assert state == ref.kv_cache_bytes(ref.PYTHIA_2_8B, 40)
    assert ref.mamba_dt_rank(ref.MAMBA_2_8B["d_model"]) == ref.MAMBA_2_8B["dt_rank"]
    config = ref.mamba_config(2560, 16)  # a config only, no weights: transformers derives the same sizes
    assert config.intermediate_size == 5120 and config.time_step_rank == 160
