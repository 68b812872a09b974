"""The collect side of the checks: what runs in the student's kernel, next to the student's code.

A ``collect`` uses only ``torch`` and the names of this module, so that it can run where the references
cannot be reached: loaders, :func:`attempt` (an exception becomes a record that verify reports), the guard
against forbidden built-ins, the collect of case tables, and stand-ins and probes that checks share.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from labkit.memory import PeakTensorMemory

__all__ = ["ConcatCache", "FixedLogits", "PeakTensorMemory", "attempt", "build", "forbidding", "load_state",
           "load_weights", "run_cases"]
RAISED = "raised"  # the key of an attempt that raised: {"raised": "TypeError: ..."}
GRADING_ENV = "LABKIT_GRADING_DIR"  # set by the grader: the folder of the run's inputs and outputs


def build(cls, weights: dict[str, torch.Tensor], what: str, *args, **kwargs) -> nn.Module:
    """The student's module ``cls(*args, **kwargs)`` with the check's weights, in eval mode."""
    module = cls(*args, **kwargs)
    load_weights(module, weights, what)
    return module.eval()


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load the check's weights, explaining the expected parameter names if they do not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        expected = ", ".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
        raise AssertionError(f"{what}: parameters must be exactly: {expected}. load_state_dict said: {error}") from None


@functools.lru_cache(maxsize=1)
def _minilm_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from labkit.data import minilm_files
    return load_file(minilm_files()["weights"])


def load_state(state: dict | str) -> dict[str, torch.Tensor]:
    """A state dict from the inputs, or, for ``"all-MiniLM-L6-v2"``, the pretrained weights that the course's
    package ships (inputs name them rather than carry 90 MB). A fresh dict: the student may change it."""
    return dict(_minilm_state() if state == "all-MiniLM-L6-v2" else state)


def attempt(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or ``{"raised": "<Error>: <message>"}`` if it raised (verify reports it).

    A forbidden built-in is not caught: its failure is the check's verdict."""
    try:
        return fn(*args, **kwargs)
    except ForbiddenBuiltinError:
        raise
    except Exception as error:  # reported by verify, with the case that raised it
        return {RAISED: f"{type(error).__name__}: {error}"[:500]}


# ---------------------------------------------------------------- forbidden built-ins
class ForbiddenBuiltinError(AssertionError):
    """The student's code called a built-in that the exercise asks them to write themselves."""


# The built-ins an exercise may forbid, by the name a message shows. nn.MultiheadAttention calls
# F.multi_head_attention_forward; nn.LayerNorm and nn.RMSNorm call F.layer_norm and F.rms_norm.
BUILTINS = {
    "F.scaled_dot_product_attention": (F.scaled_dot_product_attention,),
    "nn.MultiheadAttention": (F.multi_head_attention_forward,),
    "F.layer_norm": (F.layer_norm, F.group_norm),
    "F.rms_norm": (F.rms_norm,),
    "F.gelu": (F.gelu,),
    "F.silu": (F.silu,),
    "F.relu": (F.relu, torch.relu, torch.Tensor.relu),
    "torch.repeat_interleave": (torch.repeat_interleave, torch.Tensor.repeat_interleave),
}
COURSE_CODE = "labkit.nn"  # the course's own modules, for later labs: not an answer to the lab that builds them
_COURSE_FILES = str(Path(__file__).resolve().parent.parent / "nn")


class _Guard(TorchFunctionMode):
    """Fails any call of a forbidden built-in (and, with ``labkit.nn``, any torch call made from it)."""

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.forbidden = {fn: name for name in names if name in BUILTINS for fn in BUILTINS[name]}
        self.course_code = COURSE_CODE in names
        self.violation = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.forbidden.get(func) or (self.course_code and _called_from_course_code())
        if name:
            self.violation = self.violation or (
                f"your code calls {name}; this exercise asks you to write it yourself, from tensor operations")
            raise ForbiddenBuiltinError(self.violation)
        return func(*args, **(kwargs or {}))


def _called_from_course_code() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_COURSE_FILES):
            return f"{COURSE_CODE} ({frame.f_code.co_name}), the course's own version"
        frame = frame.f_back
    return ""


@contextmanager
def forbidding(names: tuple[str, ...]):
    """Run the block under a guard that fails on the built-ins ``names`` (keys of :data:`BUILTINS`, or
    ``"labkit.nn"``). A violation fails even if the student's code caught the exception."""
    if not names:
        yield
        return
    with _Guard(tuple(names)) as guard:
        yield
    if guard.violation:
        raise ForbiddenBuiltinError(guard.violation)


# ---------------------------------------------------------------- declarative case tables
def run_cases(inputs: dict, *students) -> dict:
    """The collect of a case table: for each case, take the student's function (``students[case["student"]]``,
    the first by default) or build their module (``init``, ``weights``, ``dtype``), call it on ``args``
    and ``kwargs``, and keep what it returns."""
    outputs = []
    for case in inputs["cases"]:
        target = students[case.get("student", 0)]
        if "init" in case:
            target = attempt(target, *case["init"], **case.get("init_kwargs", {}))
            if isinstance(target, dict):
                outputs.append(target)
                continue
            if "weights" in case:
                load_weights(target, case["weights"], case["what"])
            target = (target.to(case["dtype"]) if "dtype" in case else target).eval()
        with torch.no_grad():
            outputs.append(attempt(target, *case.get("args", ()), **case.get("kwargs", {})))
    return {"outputs": outputs}


# ---------------------------------------------------------------- stand-ins and probes
class ConcatCache:
    """The simplest cache of Lab 2's protocol: ``update(a, b)`` appends along the time axis (dim -2)
    and returns everything so far. A check of an attention module uses it so as not to depend on
    the student's own cache; it also shows what the module chose to cache."""

    def __init__(self):
        self.a = self.b = None

    def update(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.a = a if self.a is None else torch.cat([self.a, a], dim=-2)
        self.b = b if self.b is None else torch.cat([self.b, b], dim=-2)
        return self.a, self.b


class FixedLogits(nn.Module):
    """A stand-in model whose next-token logits are always the same: sampling can be tested exactly."""

    def __init__(self, logits: torch.Tensor, max_len: int = 8):
        super().__init__()
        self.register_buffer("logits", logits)
        self.max_len = max_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert idx.shape[1] <= self.max_len, f"the model got {idx.shape[1]} tokens, more than max_len={self.max_len}"
        return self.logits.expand(*idx.shape, -1)


# ---------------------------------------------------------------- grading: records and integrity probes
_BASELINE: dict = {}


def _hooks() -> dict:
    """What a submission could use to change how later cells run, or to watch them."""
    state = {"a trace or profile hook (sys.settrace...)": tuple(map(_foreign, (
                 sys.gettrace(), sys.getprofile(), threading.gettrace(), threading.getprofile()))),
             "a TorchFunctionMode": len(torch.overrides._get_current_function_mode_stack()),
             "torch function handling (torch._C.DisableTorchFunction)": torch._C._is_torch_function_enabled(),
             "the grading environment variables": (os.environ.get(GRADING_ENV), os.environ.get("LABKIT_MAX_STEPS"))}
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
    namespace = {"torch": torch, "nn": nn, "F": F} | {n: globals()[n] for n in __all__}
    exec(compile(source, f"<collect of {check_id}>", "exec"), namespace)
    inputs = torch.load(folder / "inputs" / f"{check_id}.pt", weights_only=True)
    found = integrity()
    with forbidding(forbid):
        outputs = namespace[name](inputs, *student)
    found += [f for f in integrity() if f not in found]
    with open(folder / "outputs" / f"{check_id}.pt", "xb") as f:  # "x": a file already there is not overwritten
        torch.save({"token": token, "outputs": _tidy(outputs), "integrity": found}, f)
    print(f"{check_id}: outputs recorded for grading")
