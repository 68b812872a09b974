"""The checks of Lab 3 pass on the solution and fail, with the right message, on planted bugs."""
from __future__ import annotations

import pytest

import labkit
from labkit.checks import checks_of_lab
from buggy_lab03 import BUGS
from notebook_code import solution_namespace

SOLUTION_ARGS = {  # check id -> the names the lab's check cell passes
    "03.sinusoidal": ("sinusoidal_encoding",), "03.rope": ("rotate_half", "rope_cos_sin", "apply_rope"),
    "03.rope_properties": ("rope_cos_sin", "apply_rope"), "03.alibi_slopes": ("alibi_slopes",),
    "03.alibi_bias": ("alibi_bias",), "03.rope_attention": ("CausalSelfAttention",),
    "03.alibi_attention": ("CausalSelfAttention",), "03.rope_scaling": ("rope_cos_sin",),
}


@pytest.fixture(scope="module")
def ns():
    return solution_namespace("03-position-encodings")


@pytest.fixture(autouse=True)
def not_grading(monkeypatch):
    monkeypatch.delenv("LABKIT_GRADING_DIR", raising=False)


def test_every_check_has_planted_bugs():
    assert set(BUGS) == set(checks_of_lab("03")) == set(SOLUTION_ARGS)


@pytest.mark.parametrize("check_id", sorted(SOLUTION_ARGS))
def test_solution_passes(ns, check_id, capsys):
    labkit.check(check_id, *(ns[name] for name in SOLUTION_ARGS[check_id]))
    assert capsys.readouterr().out.startswith(f"✔ {check_id}")


@pytest.mark.parametrize("check_id,bug,message",
                         [(c, bug, msg) for c, bugs in BUGS.items() for bug, msg in bugs],
                         ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_check_catches_bug(ns, check_id, bug, message):
    student = bug(ns)
    student = student if isinstance(student, tuple) else (student,)
    with pytest.raises(AssertionError, match=message):
        labkit.check(check_id, *student)


@pytest.mark.parametrize("seed", [1, 2, 2026])
def test_solution_passes_on_grader_inputs(ns, seed):
    """The grader draws other inputs: the solution must pass on them too."""
    for check_id, names in SOLUTION_ARGS.items():
        spec = checks_of_lab("03")[check_id]
        inputs = spec.make_inputs(seed)
        spec.verify(inputs, spec.collect(inputs, *(ns[name] for name in names)))
