"""The verify side's one comparison helper, and the predicates it is made of.

:func:`compare` is what every check calls: on failure it names the case, the shapes or the
largest difference and where it occurs, and then, only then, tries the check's *suspects* (the
outputs of known wrong versions) to name the student's bug.
"""

import math
from typing import Any

import torch

from labkit.checks.kernel import RAISED

Suspects = dict[str, Any]  # diagnosis -> the wrong version's output, or a function of no arguments computing it


def forbidden_calls(what: str, out: dict, how: str = "from tensor operations") -> None:
    """Fail if the student's code called into a forbidden library: ``out["called"]``, which a collect records with
    :class:`labkit.checks.kernel.PackageCalls`."""
    if out.get("called"):
        raise AssertionError(f"your {what} calls {' and '.join(out['called'])}; this exercise asks you to write it "
                             f"yourself, {how}")


def raised(value) -> str:
    """The error message of an :func:`labkit.checks.kernel.attempt` that raised, else ``""``."""
    return value[RAISED] if isinstance(value, dict) and set(value) == {RAISED} else ""


def as_tensor(what: str, value, shape: tuple | None = None) -> torch.Tensor:
    """``value`` as a float64 tensor (of ``shape``, when given), or an ``AssertionError`` saying what came back."""
    if raised(value):
        raise AssertionError(f"{what} raised {raised(value)}")
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise AssertionError(f"{what}: shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value.detach().cpu().double()


def close(got, want, atol: float = 1e-5) -> bool:
    """Whether ``got`` passes :func:`compare`: a finite tensor of ``want``'s shape within ``atol``, or equal values."""
    return (_tensor_problem if isinstance(want, torch.Tensor) else _value_problem)(got, want, atol) == ""


def compare(what: str, got, want, atol: float = 1e-5, hint: str = "", suspects: Suspects | None = None) -> None:
    """Raise an ``AssertionError`` unless ``got`` matches ``want`` within ``atol``.

    ``want`` is a tensor (compared in float64, or complex128 if either side is complex) or a plain value (an int or string must be equal, a
    float within ``atol``). On failure the message names ``what``, the problem, and either the first
    suspect that ``got`` matches (a recognised bug) or the ``hint``.
    """
    problem = _tensor_problem(got, want, atol) if isinstance(want, torch.Tensor) else _value_problem(got, want, atol)
    if not problem:
        return
    advice = first_match(got, suspects or {}, atol) or hint
    raise AssertionError(f"{what}: {problem}" + (f". {advice}" if advice else ""))


def _tensor_problem(got, want: torch.Tensor, atol: float) -> str:
    if raised(got):
        return f"raised {raised(got)}"
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor, got {type(got).__name__}"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    kind = torch.complex128 if got.is_complex() or want.is_complex() else torch.float64  # keep imaginary parts
    got, want = got.detach().cpu().to(kind), want.detach().cpu().to(kind)
    if not torch.isfinite(got).all():
        bad = tuple(torch.nonzero(~torch.isfinite(got))[0].tolist())
        return f"non-finite value {got[bad].item()} at index {bad}"
    diff = (got - want).abs().nan_to_num(nan=math.inf, posinf=math.inf)  # a NaN expected is a difference too
    if diff.numel() == 0 or diff.max() <= atol:
        return ""
    worst = tuple(torch.nonzero(diff == diff.max())[0].tolist())
    return (f"max |difference| {diff.max().item():.3g} > {atol:g} at index {worst} "
            f"(got {got[worst].item():.5g}, expected {want[worst].item():.5g})")


def _value_problem(got, want, atol: float) -> str:
    if raised(got):
        return f"raised {raised(got)}"
    if isinstance(want, bool):
        return "" if got is want else f"{got!r}, expected {want!r}"
    if isinstance(want, int) and (not isinstance(got, int) or isinstance(got, bool)):
        return f"returned {got!r} ({type(got).__name__}); it must return a Python int"
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return "" if math.isfinite(got) and abs(got - want) <= atol else f"{got!r}, expected {want!r}"
    return "" if got == want else f"{got!r}, expected {want!r}"


def assert_bf16_close(what: str, got, want: torch.Tensor, hint: str = "", max_share: float = 0.01) -> None:
    """``got`` has ``want``'s dtype and differs from it by at most one ulp, on at most ``max_share`` of
    the elements: two correct roundings rarely disagree, a wrong order of rounding disagrees on a
    quarter of them or more."""
    if not isinstance(got, torch.Tensor) or got.dtype != want.dtype:
        found = got.dtype if isinstance(got, torch.Tensor) else type(got).__name__
        raise AssertionError(f"{what}: dtype {found}, expected {want.dtype}" + (f". {hint}" if hint else ""))
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.detach().double(), want.detach().double()
    mantissa_bits = round(-math.log2(torch.finfo(want.dtype).eps))  # 7 for bfloat16, 10 for float16
    ulp = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-30))) - mantissa_bits)
    in_ulps = (g - w).abs() / ulp
    share = (g != w).double().mean().item()
    if not torch.isfinite(g).all() or in_ulps.max() > 1.0 or share > max_share:
        worst = tuple(torch.nonzero(in_ulps == in_ulps.max())[0].tolist())
        raise AssertionError(
            f"{what}: {share:.0%} of the elements differ (at most {max_share:.0%} may, by one ulp); the largest "
            f"difference is {in_ulps.max().item():.3g} ulp at index {worst} (got {g[worst].item():.5g}, expected "
            f"{w[worst].item():.5g})" + (f". {hint}" if hint else ""))


def first_match(got, candidates: Suspects, atol: float = 1e-5) -> str:
    """The name of the first candidate that ``got`` matches (each computed only when reached), else ``""``; a
    candidate that is None (or computes None) does not apply and is skipped."""
    for name, bug in candidates.items():
        want = bug() if callable(bug) else bug
        if want is not None and close(got, want, atol):
            return name
    return ""
