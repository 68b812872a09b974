"""The check toolkit: what the labs' check cells call, and what check modules are written with.

A check has three parts, so that the same check serves a student's notebook and a grader:

- ``make_inputs(seed) -> dict``: the inputs (tensors, weights, sizes), drawn from a seeded
  generator (:mod:`labkit.checks.factories`);
- ``collect(inputs, *student) -> dict``: runs the student's code on those inputs and returns its
  outputs. It is the only part that runs the student's code, and it uses only ``torch`` and
  :mod:`labkit.checks.kernel`;
- ``verify(inputs, outputs) -> str``: compares the outputs with an independent reference
  (:mod:`labkit.checks.references`) through :func:`compare`, which names the case, the largest
  difference and, from the check's suspects, the student's bug. It returns what the ``✔`` line says.

A lab's checks live in ``labkit/checks/lab<ID>.py``, each made by :func:`define` (a decorator on
``verify``) or :func:`table` (a declarative case table); its hidden checks, made by
:func:`define_hidden`, live in ``hidden_checks/lab<ID>.py``. In a notebook, ``check(id, *student)``
runs all three parts and prints ``✔ <id>: ...``. Under the grader (``LABKIT_GRADING_DIR`` set) the
kernel only runs ``collect`` on the grader's inputs and saves the outputs; the grader verifies
them in its own process, where the student's code cannot reach.
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
