"""The collect side of the checks: what runs in the student's kernel, next to the student's code.

A ``collect`` uses only ``torch`` and the names of this module, so that it can run where the references
cannot be reached: loaders, :func:`attempt` (an exception becomes a record that verify reports), the guard
against forbidden built-ins, the collect of case tables, and stand-ins and probes that checks share.
"""

import functools
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from labkit.memory import PeakTensorMemory

__all__ = ["ConcatCache", "FixedLogits", "FusedAttention", "PackageCalls", "PeakTensorMemory", "attempt", "build", "float_pair", "forbidding", "load_state",
           "load_weights", "run_cases"]
RAISED = "raised"  # the key of an attempt that raised: {"raised": "TypeError: ..."}


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


def float_pair(got, expected: str = "a tuple of 2 numbers"):
    """A result as two floats, or a record of what came back instead (it fits any schema): an attempt that raised
    passes through, anything else is described as "returned a <type> of <n>, expected <expected>"."""
    if isinstance(got, dict) and set(got) == {RAISED}:
        return got
    if isinstance(got, (tuple, list)) and len(got) == 2:
        try:
            return [float(v) for v in got]
        except (TypeError, ValueError, RuntimeError):
            pass
    size = f" of {len(got)}" if isinstance(got, (tuple, list, dict)) else ""
    return {RAISED: f"returned a {type(got).__name__}{size}, expected {expected}"}


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


class PackageCalls:
    """Records which of ``packages`` (top-level names, such as ``"faiss"``) the code run inside the block calls
    into: a profile hook sees every call of Python code on this thread. ``called`` is the sorted list. It is how
    a check forbids a library that its reference uses (rank_bm25, faiss, sentence-transformers), which the
    torch-function guard of :func:`forbidding` cannot see."""

    def __init__(self, packages: list[str]):
        self.packages, self.seen = set(packages), set()

    def _watch(self, frame, event, arg) -> None:
        package = (frame.f_globals.get("__name__") or "").split(".")[0]
        if event == "call" and package in self.packages:
            self.seen.add(package)

    def __enter__(self) -> "PackageCalls":
        self.previous = sys.getprofile()
        sys.setprofile(self._watch)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self.previous)

    @property
    def called(self) -> list[str]:
        return sorted(self.seen)


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


class FusedAttention(nn.Module):
    """Causal attention whose q, k and v are split from one fused projection: the tensors autograd saves include
    views of one storage at different offsets (q at 0, k at d_model, v at 2 d_model), so counting by the tensors'
    own data_ptr() counts that storage three times."""

    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.n_heads
        q, k, v = (t.view(B, T, h, d // h).transpose(1, 2) for t in self.qkv(x).split(d, dim=-1))
        scores = (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1) / math.sqrt(d // h)  # mul saves the views of q and k
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(mask, float("-inf")).softmax(-1)
        mixed = (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(3)  # (B, h, T, d / h); saves the view of v
        return self.out(mixed.transpose(1, 2).reshape(B, T, d))


class FixedLogits(nn.Module):
    """A stand-in model whose next-token logits are always the same: sampling can be tested exactly."""

    def __init__(self, logits: torch.Tensor, max_len: int = 8):
        super().__init__()
        self.register_buffer("logits", logits)
        self.max_len = max_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert idx.shape[1] <= self.max_len, f"the model got {idx.shape[1]} tokens, more than max_len={self.max_len}"
        return self.logits.expand(*idx.shape, -1)
