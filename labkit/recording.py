"""The grader's side of a graded kernel: it runs every check cell's collect and records what it returns.

The grader replaces each check cell by a call to :func:`record`, with a token that only that cell is given, and
starts the notebook with :func:`snapshot`. The probes of :func:`integrity` compare the kernel's hooks with the
snapshot: a submission that installed a way to change how later cells run, or to watch them, is flagged.
Only the collect side of the checks (:mod:`labkit.checks.kernel`) is in reach here.
"""
from __future__ import annotations

import builtins
import os
import sys
import threading
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.checks import kernel

GRADING_ENV = "LABKIT_GRADING_DIR"  # set by the grader: the folder of the run's inputs and outputs
_BASELINE: dict = {}
# What the recorder relies on, as it was when the grader's first cell imported this module.
_SAVE, _LOAD, _OPEN, _EXEC = torch.save, torch.load, builtins.open, builtins.exec


def _hooks() -> dict:
    """What a submission could use to change how later cells run, or to watch them."""
    state = {"a trace or profile hook (sys.settrace...)": tuple(map(_foreign, (
                 sys.gettrace(), sys.getprofile(), threading.gettrace(), threading.getprofile()))),
             "a TorchFunctionMode": len(torch.overrides._get_current_function_mode_stack()),
             "torch function handling (torch._C.DisableTorchFunction)": torch._C._is_torch_function_enabled(),
             "the grading environment variables": (os.environ.get(GRADING_ENV), os.environ.get("LABKIT_MAX_STEPS")),
             "a function the recorder relies on (torch.save, open, labkit.checks.kernel...)": tuple(map(id, (
                 torch.save, torch.load, builtins.open, builtins.exec, builtins.compile, kernel.forbidding,
                 *(getattr(kernel, n) for n in kernel.__all__)))),
             "the recorder (labkit.recording)": tuple(id(globals()[n]) for n in ("record", "integrity", "_tidy"))}
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12's low-cost tracing
    if monitoring:
        state["a sys.monitoring tool"] = tuple(monitoring.get_tool(i) for i in range(6))
    try:
        shell = get_ipython()  # noqa: F821 (IPython's kernel puts it in the builtins)
    except NameError:  # not in IPython
        return state
    lists = [getattr(shell, name) for name in ("input_transformers_cleanup", "input_transformers_post", "ast_transformers")]
    state["IPython's input transformers or events"] = tuple(sum(map(_foreign, hooks)) for hooks in
                                                             [*lists, *shell.events.callbacks.values()])
    return state


def _foreign(hook) -> bool:
    """Whether ``hook`` is code of the notebook's own (installed packages register hooks of their own)."""
    if hook is None:
        return False
    hook = getattr(getattr(hook, "__func__", hook), "func", hook)  # bound methods, functools.partial
    code = getattr(hook, "__code__", None) or getattr(getattr(type(hook), "__call__", None), "__code__", None)
    return not getattr(code, "co_filename", "").startswith((sys.prefix, sys.base_prefix))


def snapshot() -> None:
    """The grader's first cell: remember the kernel's hooks before any student cell runs."""
    _BASELINE.update(_hooks())


def integrity() -> list[str]:
    """The hooks that differ from the snapshot: each is a way to tamper with the cells that follow."""
    return [f"{name} changed since the notebook started" for name, value in _hooks().items()
            if _BASELINE and value != _BASELINE.get(name)]


def _tidy(x):
    """Outputs as the grader accepts them: plain data, and tensors detached, contiguous and in storages of their
    own size; anything else (a NumPy value, an object) as a number, a tensor or, failing that, its repr."""
    if isinstance(x, torch.Tensor):
        return x.detach().contiguous().clone().requires_grad_(x.requires_grad and x.is_floating_point())
    if isinstance(x, (list, tuple)):
        return type(x)(_tidy(y) for y in x)
    if isinstance(x, dict):
        return {k if isinstance(k, (str, int)) else repr(k): _tidy(v) for k, v in x.items()}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # a NumPy scalar
        return x.item()
    try:
        return torch.as_tensor(x).contiguous().clone()  # a NumPy array
    except (TypeError, RuntimeError, ValueError):
        return repr(x)[:200]


def record(check_id: str, token: str, source: str, name: str, *student, forbid: tuple[str, ...] = ()) -> None:
    """Grading mode, the whole of a check cell: define the check's collect from its ``source`` with nothing but
    torch and this module in reach, run it on the grader's inputs, and save what it returns with the cell's
    ``token`` (which only this cell was given) and what the integrity probes saw. The first record is final."""
    folder = Path(os.environ[GRADING_ENV])
    namespace = {"torch": torch, "nn": nn, "F": F} | {n: getattr(kernel, n) for n in kernel.__all__}
    _EXEC(compile(source, f"<collect of {check_id}>", "exec"), namespace)
    inputs = _LOAD(folder / "inputs" / f"{check_id}.pt", weights_only=True)
    found = integrity()
    with kernel.forbidding(forbid):
        outputs = namespace[name](inputs, *student)
    found += [f for f in integrity() if f not in found]
    payload = {"token": token, "outputs": _tidy(outputs), "integrity": found}
    draft = folder / "home" / f".record-{check_id}"  # written whole, then linked: a record is complete or absent
    try:
        with _OPEN(draft, "wb") as f:
            _SAVE(payload, f)
        os.link(draft, folder / "outputs" / f"{check_id}.pt")  # fails if a file is there: the first record is final
    finally:
        draft.unlink(missing_ok=True)
    print(f"{check_id}: outputs recorded for grading")
