"""Every lab's checks pass on its solution, on any seed the grader may draw, and fail with the
right message on each planted bug of tests/buggy_lab<ID>.py (BUGS: check id -> [(factory, regex)])."""
from __future__ import annotations

import functools
import importlib
import re

import nbformat
import pytest

import labkit
from labkit.checks import LAB_MODULES, checks_of_lab
from labkit.grade import hidden_checks
from notebook_code import ROOT, solution_namespace

CALL = re.compile(r'labkit\.check\("(?P<id>[\w.]+)"(?P<args>[^)]*)\)')


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


def bugs(lab: str) -> dict:
    return importlib.import_module(f"buggy_lab{lab}").BUGS


CASES = [(lab, check_id) for lab in sorted(LAB_MODULES) for check_id in sorted(checks_of_lab(lab))]
BUG_CASES = [(lab, check_id, bug, message) for lab in sorted(LAB_MODULES)
             for check_id, planted in bugs(lab).items() for bug, message in planted]


@pytest.fixture(autouse=True)
def not_grading(monkeypatch):
    monkeypatch.delenv("LABKIT_GRADING_DIR", raising=False)


@pytest.mark.parametrize("lab", sorted(LAB_MODULES))
def test_every_check_has_a_cell_and_planted_bugs(lab):
    assert set(check_args(lab)) == set(checks_of_lab(lab)) == set(bugs(lab))


@pytest.mark.parametrize("lab,check_id", CASES)
def test_solution_passes(lab, check_id, capsys):
    labkit.check(check_id, *(namespace(lab)[name] for name in check_args(lab)[check_id]))
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"✔ {check_id}")


@pytest.mark.parametrize("lab,check_id", CASES)
def test_solution_passes_on_other_seeds(lab, check_id):
    """The grader draws its own inputs (seed 2026 + the check's rank): the solution must pass on any seed."""
    spec = checks_of_lab(lab)[check_id]
    student = [namespace(lab)[name] for name in check_args(lab)[check_id]]
    for seed in (1, 2026, 2031):
        inputs = spec.make_inputs(seed)
        assert spec.verify(inputs, spec.collect(inputs, *student)).startswith("✔")


@pytest.mark.parametrize("lab,check_id,bug,message", BUG_CASES,
                         ids=[f"{c}-{b.__name__}" for _, c, b, _ in BUG_CASES])
def test_check_catches_planted_bug(lab, check_id, bug, message):
    student = bug(namespace(lab))
    student = student if isinstance(student, tuple) else (student,)
    with pytest.raises(AssertionError, match=message):
        labkit.check(check_id, *student)


HIDDEN_CASES = [(lab, hidden) for lab in sorted(LAB_MODULES) for hidden in hidden_checks(lab, None)]


@pytest.mark.parametrize("lab,hidden", HIDDEN_CASES, ids=[h.check.id for _, h in HIDDEN_CASES])
def test_hidden_check_passes_on_the_solution(lab, hidden):
    """The grader's hidden checks accept the solution (their collect runs here, in this process)."""
    student = [namespace(lab)[name] for name in hidden.args]
    for seed in (0, 2026):
        inputs = hidden.check.make_inputs(seed)
        assert hidden.check.verify(inputs, hidden.check.collect(inputs, *student)).startswith("✔")
