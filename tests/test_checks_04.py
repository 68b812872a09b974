"""The checks of Lab 4 pass on the solution and fail, with the right message, on planted bugs."""
from __future__ import annotations

import pytest

import labkit
from labkit.checks import checks_of_lab
from buggy_lab04 import BUGS
from notebook_code import solution_namespace

SOLUTION_ARGS = {  # check id -> the names the lab's check cell passes
    "04.feedforward": ("FeedForward",), "04.swiglu": ("SwiGLU",), "04.swiglu_hidden_dim": ("swiglu_hidden_dim",),
    "04.layernorm": ("LayerNorm",), "04.rmsnorm": ("RMSNorm",), "04.norm_invariance": ("LayerNorm", "RMSNorm"),
    "04.block": ("Block",), "04.layer_counts": ("layer_params", "layer_flops"),
}


@pytest.fixture(scope="module")
def ns():
    return solution_namespace("04-ffn-and-normalisation")


@pytest.fixture(autouse=True)
def not_grading(monkeypatch):
    monkeypatch.delenv("LABKIT_GRADING_DIR", raising=False)


def test_every_check_has_planted_bugs():
    assert set(BUGS) == set(checks_of_lab("04")) == set(SOLUTION_ARGS)


@pytest.mark.parametrize("check_id", sorted(SOLUTION_ARGS))
def test_solution_passes(ns, check_id, capsys):
    labkit.check(check_id, *(ns[name] for name in SOLUTION_ARGS[check_id]))
    assert capsys.readouterr().out.startswith(f"✔ {check_id}")


@pytest.mark.parametrize("check_id,bug,message",
                         [(c, bug, msg) for c, bugs in BUGS.items() for bug, msg in bugs],
                         ids=lambda v: v.__name__ if callable(v) else None)
def test_check_catches_bug(ns, check_id, bug, message):
    student = bug(ns)
    student = student if isinstance(student, tuple) else (student,)
    with pytest.raises(AssertionError, match=message):
        labkit.check(check_id, *student)


def test_hidden_checks_pass_on_the_solution():
    """The grader's hidden checks accept the solution (their collect runs here, in this process)."""
    from labkit.grade import hidden_checks

    namespace = solution_namespace("04-ffn-and-normalisation")
    for hidden in hidden_checks("04", None):
        inputs = hidden.check.make_inputs(0)
        outputs = hidden.check.collect(inputs, *(namespace[name] for name in hidden.args))
        assert hidden.check.verify(inputs, outputs).startswith(f"✔ {hidden.check.id}")
