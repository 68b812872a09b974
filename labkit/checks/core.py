"""Checks: how they are defined, found, run in a notebook, and recorded for the grader."""

import importlib
import pkgutil
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from labkit.checks.comparison import Suspects, assert_bf16_close, compare
from labkit.checks.factories import seeded_generator
from labkit.checks.kernel import forbidding, run_cases

ATTENTION_BUILTINS = ("F.scaled_dot_product_attention", "nn.MultiheadAttention")  # forbidden where a lab builds its own


@dataclass(frozen=True)
class Check:
    """One check: ``make_inputs(seed) -> dict``, ``collect(inputs, *student) -> dict`` (the only part
    that runs the student's code, under a guard against the built-ins in ``forbid``) and
    ``verify(inputs, outputs) -> str`` (compares with a reference; raises ``AssertionError``)."""
    id: str
    make_inputs: Callable[[int], dict]
    collect: Callable[..., dict]
    verify: Callable[[dict, dict], str | None]
    forbid: tuple[str, ...] = ()

    def run_collect(self, inputs: dict, *student: Any) -> dict:
        with forbidding(self.forbid):
            return self.collect(inputs, *student)

    def verdict(self, inputs: dict, outputs: dict) -> str:
        """The line a passing check prints: ``✔ <id>: <what verify says>``."""
        said = self.verify(inputs, outputs)
        return f"✔ {self.id}: {said}" if said else f"✔ {self.id}"

    def variant(self, hidden_id: str, inputs: Callable[[int], dict], args: tuple[str, ...], points: float = 1):
        """A hidden check that runs this check's collect and verify on other inputs (edge cases)."""
        return HiddenCheck(hidden_id, inputs, self.collect, self.verify, self.forbid, tuple(args), points)


@dataclass(frozen=True)
class HiddenCheck(Check):
    """A check the grader adds and students never see. Its ``collect`` is sent to the kernel as source
    code, so it uses only ``torch`` and ``labkit.checks.kernel``; ``args`` name the student's objects
    it takes, and ``points`` is what it is worth."""
    args: tuple[str, ...] = ()
    points: float = 1


def define(check_id: str, inputs: Callable[[int], dict], collect: Callable[..., dict],
           forbid: tuple[str, ...] = ()) -> Callable[[Callable], Check]:
    """Decorate a ``verify`` function to make it check ``check_id`` of its lab's module."""
    return lambda verify: Check(check_id, inputs, collect, verify, tuple(forbid))


def define_hidden(check_id: str, args: tuple[str, ...], inputs: Callable[[int], dict], collect: Callable[..., dict],
                  points: float = 1, forbid: tuple[str, ...] = ()) -> Callable[[Callable], HiddenCheck]:
    """Decorate a ``verify`` function to make it the hidden check ``check_id``."""
    return lambda verify: HiddenCheck(check_id, inputs, collect, verify, tuple(forbid), tuple(args), points)


def table(check_id: str, cases: Callable[[torch.Generator], list[dict]], reference: Callable[[dict], Any], ok: str, *,
          atol: float = 1e-5, hint: str = "", suspects: Callable[[dict], Suspects] | None = None,
          forbid: tuple[str, ...] = ()) -> Check:
    """A check of the student's function or module against ``reference(case)`` over the cases that ``cases(g)``
    draws: dicts with ``what`` (how messages name the case), ``args`` and ``kwargs`` of the call and, for a module,
    ``init``, ``init_kwargs``, ``weights`` and ``dtype`` (see :func:`~labkit.checks.kernel.run_cases`), and the case's
    own ``atol``, ``hint``, or ``max_share`` (then compared in ulps, :func:`assert_bf16_close`)."""
    def verify(inputs: dict, out: dict) -> str:
        for case, got in zip(inputs["cases"], out["outputs"], strict=True):
            if "max_share" in case:
                assert_bf16_close(case["what"], got, reference(case), case.get("hint", hint), case["max_share"])
            else:
                compare(case["what"], got, reference(case), case.get("atol", atol), case.get("hint", hint),
                        suspects(case) if suspects else None)
        return ok

    return Check(check_id, table_inputs(cases), run_cases, verify, tuple(forbid))


def table_inputs(cases: Callable[[torch.Generator], list[dict]]) -> Callable[[int], dict]:
    """The ``make_inputs`` of a case table: the cases drawn with the seed's generator."""
    return lambda seed: {"cases": cases(seeded_generator(seed))}


# ---------------------------------------------------------------- finding checks
def labs() -> list[str]:
    """The ids of the labs that have checks: one module ``labkit/checks/lab<ID>.py`` each."""
    return sorted(m.name[3:] for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("lab"))


def checks_of_lab(lab: str) -> dict[str, Check]:
    """The checks of a lab (e.g. ``"01a"``) by id, in the order its module defines them."""
    if lab not in labs():
        raise KeyError(f"no lab {lab!r}; the labs with checks are {', '.join(labs())}")
    module = importlib.import_module(f"labkit.checks.lab{lab}")
    return {c.id: c for c in vars(module).values() if type(c) is Check and c.id.startswith(f"{lab}.")}


def get_check(check_id: str) -> Check:
    found = checks_of_lab(check_id.split(".", 1)[0]).get(check_id)
    if found is None:
        raise KeyError(f"unknown check {check_id!r}")
    return found


def hidden_checks(lab: str, hidden_dir: Path | None = None) -> list[HiddenCheck]:
    """The hidden checks of ``lab`` in ``<hidden_dir>/lab<lab>.py`` (the repository's ``hidden_checks/``
    by default; none if there is no such file), in the order the file defines them."""
    path = (hidden_dir or Path(__file__).resolve().parents[2] / "hidden_checks") / f"lab{lab}.py"
    found = runpy.run_path(str(path)).values() if path.exists() else ()
    return [c for c in found if isinstance(c, HiddenCheck)]


# ---------------------------------------------------------------- running
def check(check_id: str, *student: Any) -> None:
    """Run check ``check_id`` on the student's functions or classes and print the verdict."""
    spec = get_check(check_id)
    inputs = spec.make_inputs(0)
    print(spec.verdict(inputs, spec.run_collect(inputs, *student)))
