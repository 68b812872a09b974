"""The checks of Lab 1a pass on the solution and fail, with the right message, on planted bugs."""
from __future__ import annotations

import pytest

import labkit
from labkit.checks import checks_of_lab
from buggy_lab01a import BUGS
from notebook_code import solution_namespace

SOLUTION_ARGS = {  # check id -> the names the lab's check cell passes
    "01a.sdpa": ("scaled_dot_product_attention",), "01a.causal_mask": ("causal_mask",),
    "01a.mha": ("MultiHeadAttention",), "01a.block": ("FeedForward", "DecoderBlock"), "01a.gpt": ("GPT",),
    "01a.param_count": ("GPT", "gpt_param_count"), "01a.init_loss": ("GPT",), "01a.generate": ("GPT", "generate"),
}


@pytest.fixture(scope="module")
def ns():
    return solution_namespace("01a-attention-and-gpt")


@pytest.fixture(autouse=True)
def not_grading(monkeypatch):
    monkeypatch.delenv("LABKIT_GRADING_DIR", raising=False)


def test_every_check_has_planted_bugs():
    assert set(BUGS) == set(checks_of_lab("01a")) == set(SOLUTION_ARGS)


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
