"""The check toolkit: what the labs' check cells call, and what check modules are written with.

A check is ``make_inputs(seed)`` (seeded, :mod:`~labkit.checks.factories`), ``collect(inputs, *student)`` (the only
part that runs the student's code, with nothing but torch and :mod:`~labkit.checks.kernel`) and ``verify(inputs,
outputs)`` (against :mod:`~labkit.checks.references`, through :func:`compare`). A lab's checks are the ``Check``
objects of ``labkit/checks/lab<ID>.py``, made by :func:`define` or :func:`table`; its hidden checks live in
``hidden_checks/lab<ID>.py``. In a notebook ``check(id, *student)`` runs all three parts and prints ``✔ <id>: ...``;
under the grader the kernel only records what collect returns, and the grader verifies it in its own process.
CONTRIBUTING.md describes the pattern.
"""

import importlib

# Imported on first use, so that the student's kernel, which the grader gives only the collect side
# (labkit.checks.kernel), can import it without the verify side.
_WHERE = {"comparison": ("as_tensor", "assert_bf16_close", "close", "compare", "first_match", "forbidden_calls",
                         "raised"),
          "core": ("ATTENTION_BUILTINS", "Check", "HiddenCheck", "check", "checks_of_lab", "define", "define_hidden",
                   "get_check", "hidden_checks", "labs", "table", "table_inputs"),
          "factories": ("additive", "attention_weights", "causal", "doubled", "linear_weights", "mla_weights",
                        "mlp_weights", "norm_weights", "seeded_generator"),
          "kernel": ("attempt", "load_weights")}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str):
    if name not in _MODULE:
        raise AttributeError(f"module 'labkit.checks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"labkit.checks.{_MODULE[name]}"), name)
