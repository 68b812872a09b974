"""Every lab's checks pass on its solution, on any seed the grader may draw, and fail with the
right message on each planted bug of tests/buggy_lab<ID>.py (BUGS: check id -> [(factory, regex)]).
Every collect, visible or hidden, runs with nothing but torch and labkit.checks.kernel."""
from __future__ import annotations

import builtins
import functools
import importlib
import re
import types

import nbformat
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import labkit
from labkit.checks import checks_of_lab, hidden_checks, kernel, labs
from notebook_code import ROOT, solution_namespace

CALL = re.compile(r'labkit\.check\("(?P<id>[\w.]+)"(?P<args>[^)]*)\)')


def _or_error(fn, *args):
    """fn(*args), or the exception it raised: one broken lab module must not hide the others' results."""
    try:
        return fn(*args)
    except Exception as error:
        return error


CHECKS = {lab: _or_error(checks_of_lab, lab) for lab in labs()}
HIDDEN = {lab: _or_error(hidden_checks, lab, None) for lab in labs()}
BUGS = {lab: _or_error(lambda lab: importlib.import_module(f"buggy_lab{lab}").BUGS, lab) for lab in labs()}
LOADED = lambda table: {lab: found for lab, found in table.items() if not isinstance(found, Exception)}

CASES = [(lab, check_id) for lab, checks in LOADED(CHECKS).items() for check_id in checks]
BUG_CASES = [(lab, check_id, bug, message) for lab, bugs in LOADED(BUGS).items()
             for check_id, planted in bugs.items() for bug, message in planted]
HIDDEN_CASES = [(lab, hidden) for lab, found in LOADED(HIDDEN).items() for hidden in found]


@functools.cache
def solution_path(lab: str):
    return next(p for p in sorted((ROOT / "solutions").glob("*.ipynb"))
                if nbformat.read(p, as_version=4).metadata.get("labkit", {}).get("lab") == lab)


@functools.cache
def check_args(lab: str) -> dict[str, tuple[str, ...]]:
    """Check id -> the names the solution's check cell passes to it."""
    cells = nbformat.read(solution_path(lab), as_version=4).cells
    calls = [CALL.search(c.source) for c in cells if "check" in c.metadata]
    return {m["id"]: tuple(a.strip() for a in m["args"].split(",") if a.strip()) for m in calls}


@functools.cache
def namespace(lab: str) -> dict:
    return solution_namespace(solution_path(lab).stem)


def kernel_only(collect):
    """``collect`` with nothing in reach but builtins, torch and labkit.checks.kernel (as in the kernel)."""
    if collect.__module__ == kernel.__name__:
        return collect
    allowed = {"__builtins__": builtins, "torch": torch, "nn": nn, "F": F} | {n: getattr(kernel, n) for n in kernel.__all__}
    return types.FunctionType(collect.__code__, allowed, collect.__name__, collect.__defaults__, collect.__closure__)


@pytest.fixture(autouse=True)
def not_grading(monkeypatch):
    monkeypatch.delenv("LABKIT_GRADING_DIR", raising=False)


@pytest.mark.parametrize("lab", labs())
def test_lab_modules_load(lab):
    for table in (CHECKS, HIDDEN, BUGS):
        if isinstance(table[lab], Exception):
            raise table[lab]


@pytest.mark.parametrize("lab", sorted(LOADED(CHECKS).keys() & LOADED(BUGS).keys()))
def test_every_check_has_a_cell_and_planted_bugs(lab):
    assert set(check_args(lab)) == set(CHECKS[lab]) == set(BUGS[lab])


@pytest.mark.parametrize("lab,check_id", CASES)
def test_solution_passes(lab, check_id, capsys):
    labkit.check(check_id, *(namespace(lab)[name] for name in check_args(lab)[check_id]))
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"✔ {check_id}")


@pytest.mark.parametrize("lab,check_id", CASES)
def test_solution_passes_on_other_seeds_with_a_kernel_only_collect(lab, check_id):
    """The grader draws its own inputs, so the solution must pass on any seed; and collect, which runs
    in the kernel, may use nothing but torch and labkit.checks.kernel."""
    spec = CHECKS[lab][check_id]
    student = [namespace(lab)[name] for name in check_args(lab)[check_id]]
    for seed in (1, 2026, 2031):
        inputs = spec.make_inputs(seed)
        with kernel.forbidding(spec.forbid):
            outputs = kernel_only(spec.collect)(inputs, *student)
        assert spec.verdict(inputs, outputs).startswith(f"✔ {check_id}")


@pytest.mark.parametrize("lab,check_id,bug,message", BUG_CASES,
                         ids=[f"{c}-{b.__name__}" for _, c, b, _ in BUG_CASES])
def test_check_catches_planted_bug(lab, check_id, bug, message):
    student = bug(namespace(lab))
    student = student if isinstance(student, tuple) else (student,)
    with pytest.raises(AssertionError, match=message):
        labkit.check(check_id, *student)


@pytest.mark.parametrize("lab,hidden", HIDDEN_CASES, ids=[h.id for _, h in HIDDEN_CASES])
def test_hidden_check_passes_on_the_solution(lab, hidden):
    """The grader's hidden checks accept the solution (their collect, kernel-only, runs here)."""
    student = [namespace(lab)[name] for name in hidden.args]
    for seed in (0, 2026):
        inputs = hidden.make_inputs(seed)
        with kernel.forbidding(hidden.forbid):
            outputs = kernel_only(hidden.collect)(inputs, *student)
        assert hidden.verdict(inputs, outputs).startswith(f"✔ {hidden.id}")


def test_compare_keeps_imaginary_parts():
    """A complex tensor is compared as complex: an imaginary part that differs, or is missing, is a difference."""
    from labkit.checks.comparison import close

    want = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    assert close(want.clone(), want)
    assert not close(torch.tensor([1 - 2j, 3 - 1j]), want)  # the conjugate
    assert not close(want.real, want)  # the real part alone
    assert not close(want, want.real)  # a complex result where a real one is expected
    assert close(torch.complex(want.real, torch.zeros(2)), want.real)
