"""The checks of Lab 1b pass on the solution and fail, with the right message, on planted bugs."""
from __future__ import annotations

import pytest

import labkit
from labkit.checks import checks_of_lab
from buggy_lab01b import BUGS
from notebook_code import solution_namespace

BERT = ("BertEncoder", "load_pretrained", "sentence_embeddings")
SOLUTION_ARGS = {  # check id -> the names the lab's check cell passes
    "01b.padding_bias": ("padding_bias",), "01b.bert": BERT, "01b.padding": BERT,
    "01b.wordpiece": ("WordPieceTokenizer",), "01b.mlm_mask": ("mlm_mask",), "01b.encdec": ("EncoderDecoder",),
    "01b.teacher_forcing": ("EncoderDecoder", "teacher_forcing_loss"),
    "01b.greedy": ("EncoderDecoder", "greedy_decode"), "01b.relpos": ("relative_position_bucket",),
}
# The planted bugs, which must stay in BUGS.
REQUIRED = {"01b.bert": {"bert_pre_norm", "bert_gelu_tanh", "bert_padding_on_queries"},
            "01b.encdec": {"encdec_post_norm"}, "01b.mlm_mask": {"mlm_80_20_0", "mlm_10_10_80"}}


@pytest.fixture(scope="module")
def ns():
    return solution_namespace("01b-encoders-and-seq2seq")


@pytest.fixture(autouse=True)
def not_grading(monkeypatch):
    monkeypatch.delenv("LABKIT_GRADING_DIR", raising=False)


def test_every_check_has_planted_bugs():
    assert set(BUGS) == set(checks_of_lab("01b")) == set(SOLUTION_ARGS)
    for check_id, names in REQUIRED.items():
        assert names <= {bug.__name__ for bug, _ in BUGS[check_id]}


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
