"""Check functions for the labs' check cells.

A check has three parts, so that the same check serves a student's notebook and a grader:

- ``make_inputs(seed) -> dict``: the inputs of the check (tensors, weights, sizes);
- ``collect(inputs, *student) -> dict``: runs the student's code on those inputs and
  returns its outputs. This is the only part that runs the student's code;
- ``verify(inputs, outputs) -> str``: compares the outputs with an independent reference
  (a PyTorch built-in or a closed-form property). It raises ``AssertionError`` with a
  specific message on failure and returns one deterministic line on success.

In a notebook, ``check(id, *student)`` runs all three and prints the line. Under the
grader (``LABKIT_GRADING_DIR`` set), the kernel only runs ``collect`` on inputs the grader
wrote and saves the outputs; the grader runs ``verify`` in its own process, where the
student's code cannot reach it.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

GRADING_ENV = "LABKIT_GRADING_DIR"
LAB_MODULES = {"01a": "labkit.checks.lab01a", "02": "labkit.checks.lab02", "03": "labkit.checks.lab03",
               "04": "labkit.checks.lab04",
               "01b": "labkit.checks.lab01b"}


@dataclass(frozen=True)
class Check:
    id: str
    make_inputs: Callable[[int], dict]
    collect: Callable[..., dict]
    verify: Callable[[dict, dict], str]


def checks_of_lab(lab: str) -> dict[str, Check]:
    """All checks of a lab (e.g. ``"01a"``), by id."""
    module = importlib.import_module(LAB_MODULES[lab])
    return {c.id: c for c in module.CHECKS}


def get_check(check_id: str) -> Check:
    lab = check_id.split(".", 1)[0]
    if lab not in LAB_MODULES or check_id not in checks_of_lab(lab):
        raise KeyError(f"unknown check {check_id!r}")
    return checks_of_lab(lab)[check_id]


def check(check_id: str, *student: Any) -> None:
    """Run check ``check_id`` on the student's functions or classes and print the verdict."""
    spec = get_check(check_id)
    grading_dir = os.environ.get(GRADING_ENV)
    if grading_dir:
        record(spec, Path(grading_dir), *student)
        return
    inputs = spec.make_inputs(0)
    outputs = spec.collect(inputs, *student)
    print(spec.verify(inputs, outputs))


def record(spec: Check, folder: Path, *student: Any) -> None:
    """Grading mode: run ``collect`` on the grader's inputs and save the outputs for the grader."""
    record_with(spec.id, spec.collect, *student, folder=folder)


def record_with(check_id: str, collect: Callable[..., dict], *student: Any, folder: Path | None = None) -> None:
    """Save ``collect(inputs, *student)`` for the grader. The first record of a check is final."""
    folder = Path(folder or os.environ[GRADING_ENV])
    inputs = torch.load(folder / "inputs" / f"{check_id}.pt", weights_only=True)
    outputs = collect(inputs, *student)
    with open(folder / "outputs" / f"{check_id}.pt", "xb") as f:  # "x": never overwrite an earlier record
        torch.save(outputs, f)
    print(f"{check_id}: outputs recorded for grading")


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for a check's inputs: the same seed draws the same inputs everywhere."""
    return torch.Generator().manual_seed(seed)


def linear_weights(prefix: str, d_in: int, d_out: int, g: torch.Generator, bias: bool = True) -> dict:
    """Random weights for an ``nn.Linear(d_in, d_out)`` named ``prefix``, scaled like its default init."""
    weights = {f"{prefix}.weight": torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)}
    if bias:
        weights[f"{prefix}.bias"] = 0.1 * torch.randn(d_out, generator=g)
    return weights


def assert_close(what: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, hint: str = "") -> None:
    """Raise an ``AssertionError`` naming the case, the shapes or the largest difference."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        bad = tuple(torch.nonzero(~torch.isfinite(got))[0].tolist())
        raise AssertionError(f"{what}: non-finite value {got[bad].item()} at index {bad}" + (f". {hint}" if hint else ""))
    diff = (got - want).abs()
    if diff.max() > atol:
        worst = tuple(torch.nonzero(diff == diff.max())[0].tolist())
        raise AssertionError(
            f"{what}: max |difference| {diff.max().item():.3g} > {atol:g} at index {worst} "
            f"(got {got[worst].item():.5g}, expected {want[worst].item():.5g})" + (f". {hint}" if hint else ""))


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load the check's weights, explaining the expected parameter names if they do not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        expected = ", ".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
        raise AssertionError(f"{what}: parameters must be exactly: {expected}. load_state_dict said: {error}") from None
