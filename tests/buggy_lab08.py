"""Plausible wrong implementations of Lab 8, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- the zero-order hold
def zoh_with(ns, bug: str):
    def discretize_zoh(A, B, dt):
        dtA = dt * A
        A_bar = torch.exp(A) if bug == "exp_A" else torch.exp(dtA)  # BUG (exp_A): exp(A)
        safe = torch.where(A == 0, torch.ones_like(A), A)
        B_bar = {"euler": lambda: dt * B,  # BUG: Mamba's Euler B
                 "no_inverse": lambda: torch.expm1(dtA) * B,  # BUG: no 1 / A
                 "no_dt": lambda: torch.expm1(dtA) / (dt * safe) * B,  # BUG: (dt A)^-1 (exp(dt A) - 1) B
                 "exp_minus_one": lambda: torch.where(A == 0, dt * B, (torch.exp(dtA) - 1) / safe * B),  # BUG
                 "nan_at_zero": lambda: torch.expm1(dtA) / A * B,  # BUG: 0 / 0 where A = 0
                 }.get(bug, lambda: torch.where(A == 0, dt * B, torch.expm1(dtA) / safe * B))()
        if bug == "bilinear":  # BUG: the bilinear transform
            A_bar, B_bar = (1 + dtA / 2) / (1 - dtA / 2), dt * B / (1 - dtA / 2)
        return A_bar, B_bar
    return discretize_zoh


# ---------------------------------------------------------------- the two modes
def modes_with(ns, bug: str):
    real_output = ns["real_output"]

    def ssm_recurrent(u, A_bar, B_bar, C):
        x = torch.zeros_like(A_bar * B_bar * C)
        ys = []
        for u_k in u:
            before = x
            x = A_bar * x + B_bar * u_k
            if bug == "vdot":
                ys.append(torch.vdot(C, x))  # BUG: vdot conjugates C
            else:
                ys.append((C * (before if bug == "previous" else x)).sum())  # BUG (previous): x_{k-1}
        y = torch.stack(ys)
        if bug == "always_2re":  # BUG: 2 Re also for a real system
            return 2 * y.real
        return y.real if bug == "real" and y.is_complex() else real_output(y)  # BUG (real): Re, not 2 Re

    def ssm_convolution(u, A_bar, B_bar, C):
        L = u.shape[-1]
        K = ns["ssm_kernel"](A_bar, A_bar * B_bar if bug == "kernel_from_1" else B_bar, C, L)  # BUG: from C A B
        if bug == "circular":  # BUG: n = L wraps around
            return torch.fft.irfft(torch.fft.rfft(u, n=L) * torch.fft.rfft(K, n=L), n=L)
        if bug == "centre":  # BUG: padding on both sides, the centre kept
            full = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)
            return full[..., L // 2:L // 2 + L]
        return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]

    return ssm_recurrent, (ssm_convolution if bug in ("kernel_from_1", "circular", "centre")
                           else ns["ssm_convolution"])


# ---------------------------------------------------------------- S4D's kernel
def s4d_with(ns, bug: str):
    def s4d_kernel(A, B, C, dt, L):
        _, B_bar = ns["discretize_zoh"](A, B, dt)
        B_bar = {"euler": dt * B, "no_inverse": torch.expm1(dt * A) * B}.get(bug, B_bar)  # BUG: the wrong B_bar
        k = torch.arange(1, L + 1) if bug == "from_1" else torch.arange(L)  # BUG (from_1): k = 1 .. L
        vandermonde = torch.exp((1 if bug == "no_dt" else dt) * A[:, None] * k)  # BUG (no_dt): exp(A k)
        K = (C * B_bar) @ vandermonde
        if bug == "always_2re":  # BUG: 2 Re also for a real A
            return 2 * K.real
        return K.real if bug == "real" and K.is_complex() else ns["real_output"](K)  # BUG (real): Re

    return s4d_kernel


# ---------------------------------------------------------------- the selective scan
def scan_with(ns, bug: str):
    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
        if bug == "B_reshaped":  # BUG: B read as (B, L, N)
            B = B.reshape(B.shape[0], B.shape[2], B.shape[1]).transpose(1, 2)
        if bug == "in_place" and delta_bias is not None:  # BUG: changes the caller's delta
            delta += delta_bias[:, None]
        elif delta_bias is not None and bug not in ("bias_after", "bias_with_softplus_only"):
            delta = delta + delta_bias[:, None]
        if bug == "bias_with_softplus_only" and delta_bias is not None and delta_softplus:  # BUG: lost without softplus
            delta = delta + delta_bias[:, None]
        if (delta_softplus or bug == "softplus_always") and bug != "no_softplus":  # BUG (no_softplus, softplus_always)
            delta = F.softplus(delta)
        if delta_softplus and bug == "softplus_twice":  # BUG: softplus again
            delta = F.softplus(delta)
        if delta_bias is not None and bug == "bias_after":  # BUG: after softplus
            delta = delta + delta_bias[:, None]
        if bug == "gate_before" and z is not None:  # BUG: the gate on u, before the scan
            u, z = u * F.silu(z), None
        if bug == "neg_exp":  # BUG: A = -exp(A) again
            A = -torch.exp(A)
        dA = torch.exp(A[None, :, None, :].expand(u.shape[0], -1, u.shape[-1], -1) if bug == "exp_A"
                       else delta[..., None] * A[:, None, :])  # BUG (exp_A): exp(A)
        step = torch.expm1(delta[..., None] * A[:, None, :]) / A[:, None, :] if bug == "zoh_B" else delta[..., None]
        step = 1 if bug == "no_delta_input" else step  # BUG (no_delta_input): B u without delta
        dBu = step * u[..., None] * B.transpose(1, 2)[:, None]  # BUG (zoh_B): the ZOH's B_bar
        h = torch.zeros_like(dA[:, :, 0])
        ys = []
        for t in range(u.shape[-1]):
            before = h
            h = dA[:, :, t] * h + (0 * dBu[:, :, t] if bug == "skip_first" and t == 0 else dBu[:, :, t])
            ys.append(((before if bug == "previous" else h) * C[:, None, :, t]).sum(-1))  # BUG (previous)
        y = torch.stack(ys, dim=-1)
        if bug == "last_before":  # BUG: the state before the last step
            h = before
        if D is not None and bug not in ("no_D", "D_after_gate"):
            y = y + D[:, None] * u
        if z is not None:  # BUG (gate_no_silu, gate_sigmoid): y * z, y * sigmoid(z)
            y = y * {"gate_no_silu": z, "gate_sigmoid": torch.sigmoid(z)}.get(bug, F.silu(z))
        if D is not None and bug == "D_after_gate":  # BUG: D u after the gate
            y = y + D[:, None] * u
        return (y, h) if return_last_state else y

    return selective_scan


def scan_calls_transformers(ns):
    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan  # BUG: the library itself
        return mamba_selective_scan.__wrapped__(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                return_last_state)

    return selective_scan


# ---------------------------------------------------------------- the parallel scan
def parallel_with(ns, bug: str):
    def parallel_scan(a, b):
        if bug == "exclusive":  # BUG: the exclusive scan
            return F.pad(ns["parallel_scan"](a, b)[..., :-1], (1, 0))
        if bug == "drop_first":  # BUG: b_1 dropped
            return ns["parallel_scan"](a, torch.cat([torch.zeros_like(b[..., :1]), b[..., 1:]], -1))
        if bug == "cumprod":  # BUG: h_t = P_t sum_s b_s / P_s with P = cumprod(a), which underflows in float32
            P = torch.cumprod(a, -1)
            return P * torch.cumsum(b / P, -1)
        L, s = a.shape[-1], 1
        if bug == "in_place":  # BUG: updates the caller's a and b
            while s < L:
                b[..., s:] = a[..., s:] * b[..., :-s] + b[..., s:]
                a[..., s:] = a[..., s:] * a[..., :-s]
                s *= 2
            return b
        if bug == "roll":  # BUG: torch.roll wraps around
            while s < L:
                b, a = a * torch.roll(b, s, -1) + b, a * torch.roll(a, s, -1)
                s *= 2
            return b
        while (2 * s < L) if bug == "early" else (s < L):  # BUG (early): one round short
            if bug == "order":  # BUG: a1 b2 + b1
                new_b = a[..., :-s] * b[..., s:] + b[..., :-s]
            else:
                new_a = a[..., s:] * a[..., :-s]
                new_b = (new_a if bug == "a_first" else a[..., s:]) * b[..., :-s] + b[..., s:]  # BUG (a_first)
            b = torch.cat([b[..., :s], new_b], dim=-1)
            a = torch.cat([a[..., :s], a[..., s:] * a[..., :-s]], dim=-1)
            s = s + 1 if bug == "plus_one" else 2 * s  # BUG (plus_one): offsets 1, 2, 3, ...
        return b

    return parallel_scan


def parallel_python_loop(ns):
    def parallel_scan(a, b):  # BUG: a Python loop over t
        h, out = torch.zeros_like(b[..., 0]), []
        for t in range(b.shape[-1]):
            h = a[..., t] * h + b[..., t]
            out.append(h)
        return torch.stack(out, dim=-1)

    return parallel_scan


# ---------------------------------------------------------------- the Mamba block
def block_with(ns, bug: str):
    scan = scan_with(ns, bug)

    class MambaBlock(ns["MambaBlock"]):
        def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", scan="parallel"):
            super().__init__(d_model, d_state, d_conv, expand,
                             d_model // 16 if bug == "floor_rank" and dt_rank == "auto" else dt_rank, scan)  # BUG

        def forward(self, x):
            L = x.shape[1]
            x, z = self.in_proj(x).chunk(2, dim=-1)
            if bug == "swapped_halves":  # BUG: z first
                x, z = z, x
            before_conv = x.transpose(1, 2)
            full = F.conv1d(before_conv, self.conv1d.weight, None if bug == "no_conv_bias" else self.conv1d.bias,
                            padding=self.d_conv if bug == "lag" else self.d_conv - 1,
                            groups=self.d_inner)  # BUG (no_conv_bias, lag: padded by d_conv)
            x = F.silu(full[..., (self.d_conv - 1) // 2:(self.d_conv - 1) // 2 + L] if bug == "centre"
                       else full[..., :L])  # BUG (centre): not causal
            delta, B, C = self.ssm_inputs(x.transpose(1, 2))
            if bug == "BC_swapped":  # BUG
                B, C = C, B
            if bug == "bias_twice":  # BUG: the bias in delta and in the scan
                delta = delta + self.dt_proj.bias
            A = {"A_positive": torch.exp(self.A_log), "A_minus_log": -self.A_log}.get(
                bug, -torch.exp(self.A_log))  # BUG (A_positive, A_minus_log)
            if bug == "D_before_conv":  # BUG: D times the conv's input
                y = scan(x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), None, None,
                         self.dt_proj.bias, True)
                y = (y + self.D[:, None] * before_conv) * F.silu(z.transpose(1, 2))
                return self.out_proj(y.transpose(1, 2))
            y = scan(x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D, z.transpose(1, 2),
                     self.dt_proj.bias, True)
            return self.out_proj(y.transpose(1, 2))

        def step(self, x_t, state=None):
            if bug in ("conv_state_reversed", "fresh_state"):
                if state is None or bug == "fresh_state":  # BUG (fresh_state): the state ignored
                    state = (x_t.new_zeros(len(x_t), self.d_inner, self.d_conv),
                             x_t.new_zeros(len(x_t), self.d_inner, self.d_state))
                conv_state, ssm_state = state
                x, z = self.in_proj(x_t).chunk(2, dim=-1)
                conv_state = torch.cat([x[..., None], conv_state[..., :-1]], dim=-1)  # BUG: newest first
                if bug == "fresh_state":
                    conv_state = conv_state.flip(-1)
                x = F.silu((conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
                delta, B, C = self.ssm_inputs(x)
                delta = F.softplus(delta + self.dt_proj.bias)
                ssm_state = torch.exp(delta[..., None] * -torch.exp(self.A_log)) * ssm_state + (
                    delta * x)[..., None] * B[:, None]
                y = (ssm_state * C[:, None]).sum(-1) + self.D * x
                return self.out_proj(y * F.silu(z)), (conv_state, ssm_state)
            return super().step(x_t, state)

    return MambaBlock


def block_step_with(ns, bug: str):
    class MambaBlock(ns["MambaBlock"]):
        def step(self, x_t, state=None):
            if bug == "module_state":  # BUG: the state kept on the module; the one passed is ignored
                y, self.kept = super().step(x_t, getattr(self, "kept", None))
                return y, self.kept
            if state is None:
                state = (x_t.new_zeros(len(x_t), self.d_inner, self.d_conv),
                         x_t.new_zeros(len(x_t), self.d_inner, self.d_state))
            conv_state, ssm_state = state
            x, z = self.in_proj(x_t).chunk(2, dim=-1)
            conv_state = torch.cat([conv_state[..., 1:], x[..., None]], dim=-1)
            x = F.silu((conv_state * self.conv1d.weight[:, 0]).sum(-1))  # BUG (no_conv_bias): + conv1d.bias left out
            delta, B, C = self.ssm_inputs(x)
            delta = F.softplus(delta + self.dt_proj.bias)
            ssm_state = torch.exp(delta[..., None] * -torch.exp(self.A_log)) * ssm_state + (
                delta * x)[..., None] * B[:, None]
            y = (ssm_state * C[:, None]).sum(-1) + self.D * x
            return self.out_proj(y * F.silu(z)), (conv_state, ssm_state)

    return MambaBlock


def block_step_no_D(ns):
    class MambaBlock(ns["MambaBlock"]):
        def step(self, x_t, state=None):
            y, state = super().step(x_t, state)
            x = F.silu((state[0] * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
            z = self.in_proj(x_t).chunk(2, dim=-1)[1]
            return y - self.out_proj(self.D * x * F.silu(z)), state  # BUG: D x left out of step

    return MambaBlock


def block_calls_transformers(ns):
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    class MambaBlock(ns["MambaBlock"]):
        def forward(self, x):
            L = x.shape[1]
            x, z = self.in_proj(x).chunk(2, dim=-1)
            x = F.silu(self.conv1d(x.transpose(1, 2))[..., :L])
            delta, B, C = self.ssm_inputs(x.transpose(1, 2))
            y = mamba_selective_scan.__wrapped__(x, delta.transpose(1, 2), -torch.exp(self.A_log),  # BUG
                                                 B.transpose(1, 2), C.transpose(1, 2), self.D, z.transpose(1, 2),
                                                 self.dt_proj.bias, True)
            return self.out_proj(y.transpose(1, 2))

    return MambaBlock


# ---------------------------------------------------------------- the chunked SSD
def ssd_with(ns, bug: str):
    def segment_sums(a):
        sums = ns["segment_sums"](a)
        return sums.nan_to_num(neginf=0.0) if bug == "future" else sums  # BUG (future): 0, not -inf, above the diagonal

    def ssd_chunked(x, dt, A, B, C, chunk_size):
        Bsz, L, H, P = x.shape
        G = B.shape[2]
        if bug == "in_place":  # BUG: changes the caller's x
            x *= dt[..., None]
        pad = 0 if bug == "no_pad" else -L % chunk_size  # BUG (no_pad): the tail is not padded
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        if bug == "modulo":  # BUG: head h reads group h % G
            B, C = (t[:, :, torch.arange(H) % G] for t in (B, C))
        else:
            B, C = (t.repeat_interleave(H // G, dim=2) for t in (B, C))
        n = x.shape[1] // chunk_size
        X = x if bug == "in_place" else x * dt[..., None]
        A_dt = A.expand_as(dt) if bug == "exp_A" else dt * A  # BUG (exp_A): exp(A)
        X, B, C = (t[:, :n * chunk_size].reshape(Bsz, n, chunk_size, H, -1) for t in (X, B, C))
        A_dt = A_dt[:, :n * chunk_size].reshape(Bsz, n, chunk_size, H).permute(0, 3, 1, 2)
        A_cum = A_dt.cumsum(-1)
        decay = torch.exp(segment_sums(A_dt))
        if bug == "diagonal":  # BUG: the diagonal of the decay matrix excluded
            decay = decay * (1 - torch.eye(chunk_size))
        y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, X)
        to_end = torch.exp(A_cum[..., -1:] - A_cum)
        states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, X)
        states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
        chunk_decay = torch.exp(segment_sums(F.pad(A_cum[..., -1], (1, 0))))
        states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]
        if bug == "undecayed":  # BUG: the earlier chunks' states summed without their decay
            states = torch.cat([torch.zeros_like(states[:, :1]), torch.einsum(
                "bclhn,bhcl,bclhp->bchpn", B, to_end, X)], dim=1).cumsum(1)[:, :-1]
        if bug == "reset":  # BUG: each chunk starts from zero
            states = torch.zeros_like(states)
        y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cum))
        return (y_diag + y_off).reshape(Bsz, n * chunk_size, H, P)[:, :L]

    return ssd_chunked


def ssd_calls_transformers(ns):
    def ssd_chunked(x, dt, A, B, C, chunk_size):
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan  # BUG: the library itself
        return mamba2_chunk_scan.__wrapped__(x, dt, A, B, C, chunk_size, dt_limit=(-float("inf"), float("inf")))

    return ssd_chunked


def bug(factory, *args):
    """A factory of the namespace alone, named after the bug it plants (the tests' ids show it)."""
    made = lambda ns: factory(ns, *args)
    made.__name__ = f"{factory.__name__}_{'_'.join(map(str, args))}"
    return made


SCAN = r"selective_scan \(.*\): (y|the last state h_L) \(vs transformers' mamba_selective_scan, torch path\): max "
BLOCK = r"MambaBlock\(.*forward \(vs transformers' MambaMixer, torch path\): max \|difference\|.*"
SSD = r"ssd_chunked\(.*\(vs .*\): max \|difference\|.*"

# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "08.discretize_zoh": [
        (bug(zoh_with, "exp_A"), r"A_bar \(vs matrix_exp.*A_bar = exp\(A\): it is exp\(dt A\)"),
        (bug(zoh_with, "euler"), r"B_bar \(vs matrix_exp.*this is Euler's B_bar = dt B"),
        (bug(zoh_with, "no_inverse"), r"B_bar \(vs matrix_exp.*B_bar lacks the 1 / A"),
        (bug(zoh_with, "no_dt"), r"B_bar \(vs matrix_exp.*B_bar lacks the dt of dt B"),
        (bug(zoh_with, "bilinear"), r"A_bar \(vs matrix_exp.*this is the bilinear transform's A_bar"),
        (bug(zoh_with, "exp_minus_one"), r"tiny dt A.*B_bar / dt \(vs the closed form\).*use torch\.expm1"),
        (bug(zoh_with, "nan_at_zero"), r"A = 0 entries.*B_bar.*non-finite value nan.*Where A = 0, expm1\(dt A\) / A "
                                       r"is 0 / 0"),
    ],
    "08.ssm_modes": [
        (bug(modes_with, "previous"), r"ssm_recurrent\(u, A_bar, B_bar, C\) with a real.*y_k reads the state before "
                                      r"the update"),
        (bug(modes_with, "real"), r"ssm_recurrent\(.*S4D-Lin.*this is Re\(\.\) of the complex system"),
        (bug(modes_with, "vdot"), r"ssm_recurrent\(.*S4D-Lin.*C is conjugated \(torch\.vdot"),
        (bug(modes_with, "circular"), r"ssm_convolution\(.*\(vs the recurrent mode.*this is a circular convolution"),
        (bug(modes_with, "centre"), r"ssm_convolution\(.*this convolution is not causal: it keeps the middle L"),
        (bug(modes_with, "kernel_from_1"), r"ssm_convolution\(.*the kernel starts at C A_bar B_bar"),
        (bug(modes_with, "always_2re"), r"ssm_recurrent\(.*with a real diagonal A_bar.*this is 2 Re\(\.\) of a real "
                                        r"system"),
    ],
    "08.s4d_kernel": [
        (bug(s4d_with, "no_dt"), r"s4d_kernel\(.*the powers are exp\(A k\)"),
        (bug(s4d_with, "euler"), r"s4d_kernel\(.*this is Euler's B_bar = dt B"),
        (bug(s4d_with, "no_inverse"), r"s4d_kernel\(.*B_bar lacks the 1 / A"),
        (bug(s4d_with, "from_1"), r"s4d_kernel\(.*the kernel starts at k = 1"),
        (bug(s4d_with, "real"), r"s4d_kernel\(.*this is Re\(\.\): N/2 modes stand for N real states"),
        (bug(s4d_with, "always_2re"), r"s4d_kernel\(.*with a real A.*this is 2 Re\(\.\) of a real A"),
    ],
    "08.selective_scan": [
        (bug(scan_with, "exp_A"), SCAN + r".*dA = exp\(A\): the discretised decay is exp\(delta A\)"),
        (bug(scan_with, "neg_exp"), SCAN + r".*A is negated and exponentiated again"),
        (bug(scan_with, "zoh_B"), SCAN + r".*this is the ZOH's B_bar.*Mamba takes Euler's delta B u"),
        (bug(scan_with, "no_softplus"), SCAN + r".*softplus is missing"),
        (bug(scan_with, "bias_after"), SCAN + r".*delta_bias is added after softplus"),
        (bug(scan_with, "previous"), SCAN + r".*y_t reads the state before the update"),
        (bug(scan_with, "skip_first"), SCAN + r".*the first input is dropped"),
        (bug(scan_with, "no_D"), SCAN + r".*the skip term D u is missing"),
        (bug(scan_with, "gate_before"), SCAN + r".*the gate is applied to u before the scan"),
        (bug(scan_with, "gate_no_silu"), SCAN + r".*the gate multiplies by z: it multiplies by silu\(z\)"),
        (bug(scan_with, "D_after_gate"), SCAN + r".*D u is added after the gate"),
        (bug(scan_with, "B_reshaped"), SCAN + r".*B is read as \(B, L, N\): its layout is \(B, N, L\)"),
        (bug(scan_with, "softplus_always"), r"selective_scan \(plain: .*softplus is applied although "
                                            r"delta_softplus=False"),
        (bug(scan_with, "softplus_twice"), SCAN + r".*softplus is applied twice"),
        (bug(scan_with, "bias_with_softplus_only"), r"selective_scan \(with delta_bias, no softplus: .*delta_bias is "
                                                    r"missing"),
        (bug(scan_with, "no_delta_input"), SCAN + r".*the input lacks its delta"),
        (bug(scan_with, "gate_sigmoid"), SCAN + r".*the gate multiplies by sigmoid\(z\)"),
        (bug(scan_with, "last_before"), r"selective_scan \(plain: .*the last state h_L .*the last state is the one "
                                        r"before the last step"),
        (bug(scan_with, "in_place"), r"selective_scan \(with delta_bias, no softplus: .*\): changed delta in place.*"
                                     r"the caller's tensors must stay as they were"),
        (scan_calls_transformers, r"your selective_scan calls transformers; this exercise asks you to write it"),
    ],
    "08.parallel_scan": [
        (bug(parallel_with, "exclusive"), r"parallel_scan\(a, b\) of shape \(2, 3, 2\).*this is the exclusive scan"),
        (bug(parallel_with, "drop_first"), r"parallel_scan\(a, b\) of shape \(2, 3, 2\).*the first input is dropped"),
        (bug(parallel_with, "order"), r"parallel_scan\(a, b\) of shape \(2, 3, 2\).*applied in the wrong order"),
        (bug(parallel_with, "a_first"), r"shape \(2, 3, 2\).*a is updated before b"),
        (bug(parallel_with, "plus_one"), r"shape \(2, 3, 7\).*the offsets grow by 1: they double"),
        (bug(parallel_with, "early"), r"shape \(2, 3, 2\).*the last round is missing"),
        (bug(parallel_with, "roll"), r"shape \(2, 3, 2\).*the shift wraps around \(torch\.roll\)"),
        (bug(parallel_with, "in_place"), r"parallel_scan\(a, b\) of shape \(2, 3, 2\): changed a, b in place"),
        (bug(parallel_with, "cumprod"), r"on the timing input \(2, 8, 1024\) float32.*non-finite value.*underflows to "
                                        r"0.*cumprod\(a\)"),
        (parallel_python_loop, r"parallel_scan on \(2, 8, 1024\) float32 took .* ms, a Python loop over t .* not 5x or "
                               r"more"),
    ],
    "08.mamba_block": [
        (bug(block_with, "swapped_halves"), BLOCK + r"in_proj's halves are swapped"),
        (bug(block_with, "centre"), BLOCK + r"the conv is not causal: it keeps the middle L outputs"),
        (bug(block_with, "BC_swapped"), BLOCK + r"B and C are swapped: x_proj's output splits as \(dt, B, C\)"),
        (bug(block_with, "bias_twice"), BLOCK + r"dt_proj's bias is added twice"),
        (bug(block_with, "A_positive"), BLOCK + r"A = exp\(A_log\) is positive"),
        (bug(block_with, "no_softplus"), BLOCK + r"softplus is missing"),
        (bug(block_with, "no_D"), BLOCK + r"the skip term D u is missing"),
        (bug(block_with, "gate_before"), BLOCK + r"the gate is applied to u before the scan"),
        (bug(block_with, "lag"), BLOCK + r"the conv lags by one token"),
        (bug(block_with, "no_conv_bias"), BLOCK + r"the conv's bias is missing"),
        (bug(block_with, "A_minus_log"), BLOCK + r"A = -A_log: A_log is the log of -A"),
        (bug(block_with, "D_before_conv"), BLOCK + r"D multiplies x before the conv"),
        (bug(block_step_with, "no_conv_bias"), r"step, token by token from state=None, against the full forward: "
                                               r"max .*the conv's bias is missing"),
        (bug(block_step_with, "module_state"), r"step, decoding two sequences in turn .*the outputs for x: max "
                                               r"\|difference\|.*a state kept on the module"),
        (bug(block_with, "floor_rank"), r"MambaBlock\(20, .*dt_rank='auto'.*the parameters' names and shapes: .*"
                                        r"dt_rank 'auto' is ceil\(d_model / 16\)"),
        (bug(block_with, "conv_state_reversed"), r"step, token by token from state=None, against the full forward: "
                                                 r"max .*the conv's taps are reversed"),
        (bug(block_with, "fresh_state"), r"step, token by token from state=None, against the full forward: max "
                                         r"\|difference\|.*step: roll conv_state left"),
        (block_step_no_D, r"step, token by token from state=None, against the full forward: .*the skip term D u is "
                          r"missing"),
        (block_calls_transformers, r"your MambaBlock calls transformers"),
    ],
    "08.ssd_chunked": [
        (bug(ssd_with, "reset"), SSD + r"each chunk starts from a zero state: it forgets the inter-chunk state"),
        (bug(ssd_with, "modulo"), r"G = 2 groups.*head h reads group h % G"),
        (bug(ssd_with, "exp_A"), SSD + r"the decay is exp\(A\): it is exp\(dt A\)"),
        (bug(ssd_with, "diagonal"), SSD + r"the input at t does not reach y_t"),
        (bug(ssd_with, "no_pad"), r"ssd_chunked\(x \(2, 13, .*chunk_size=4\).*: (shape|raised).*pad L to whole "
                                  r"chunks"),
        (bug(ssd_with, "future"), SSD + r"the decay matrix L is 1 above its diagonal"),
        (bug(ssd_with, "undecayed"), SSD + r"the states of earlier chunks reach a chunk without their decay"),
        (bug(ssd_with, "in_place"), r"ssd_chunked\(x \(2, 13, 4, 3\).*\): changed x in place"),
        (ssd_calls_transformers, r"your ssd_chunked calls transformers"),
    ],
}
