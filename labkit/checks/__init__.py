"""The check toolkit: what the labs' check cells call, and what check modules are written with.

A check is ``make_inputs(seed)`` (seeded, :mod:`~labkit.checks.factories`), ``collect(inputs, *student)`` (the only
part that runs the student's code, with nothing but torch and :mod:`~labkit.checks.kernel`) and ``verify(inputs,
outputs)`` (against :mod:`~labkit.checks.references`, through :func:`compare`). A lab's checks are the ``Check``
objects of ``labkit/checks/lab<ID>.py``, made by :func:`define` or :func:`table`; its hidden checks live in
``hidden_checks/lab<ID>.py``. In a notebook ``check(id, *student)`` runs all three parts and prints ``✔ <id>: ...``;
under the grader the kernel only records what collect returns, and the grader verifies it in its own process.
CONTRIBUTING.md describes the pattern.
"""
from __future__ import annotations

from labkit.checks.compare import as_tensor, assert_bf16_close, close, compare, first_match, raised
from labkit.checks.core import (GRADING_ENV, Check, HiddenCheck, check, checks_of_lab, define, define_hidden,
                                get_check, hidden_checks, labs, record, table, table_inputs)
from labkit.checks.factories import (additive, attention_weights, causal, doubled, linear_weights, mlp_weights,
                                     norm_weights, seeded_generator)
from labkit.checks.kernel import attempt, load_weights

__all__ = ["GRADING_ENV", "Check", "HiddenCheck", "additive", "as_tensor", "assert_bf16_close", "attempt",
           "attention_weights", "causal", "check", "checks_of_lab", "close", "compare", "define", "define_hidden",
           "doubled", "first_match", "get_check", "hidden_checks", "labs", "linear_weights", "load_weights",
           "mlp_weights", "norm_weights", "raised", "record", "seeded_generator", "table", "table_inputs"]
