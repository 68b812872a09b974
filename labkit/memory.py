"""Peak tensor memory on any device, the CPU included, where PyTorch's allocator keeps no statistics.

:class:`PeakTensorMemory` does for tensors what ``tracemalloc`` does for Python objects. It is a
``TorchFunctionMode``, PyTorch's public hook that sees every call of a torch function: for each
tensor a call returns whose storage is new (not a view of an argument, not an in-place update), it
adds the storage's bytes to a running total, and a finaliser subtracts them when the storage is
freed. The peak of the total is the peak memory of the tensors created inside the ``with`` block;
temporaries inside a single operation (inside ``softmax``, say) are not seen. A second sum, never
decreased, counts every new storage once, freed or not: the bytes the block created in all, which
grows with the work done where the peak may not (a loop that builds and frees a large tensor at
every step).
"""
from __future__ import annotations

import weakref

import torch
from torch.overrides import TorchFunctionMode


class PeakTensorMemory(TorchFunctionMode):
    """Inside a ``with`` block: the bytes of tensor storage created there that are ``live``, at their
    ``peak``, and in ``total`` (the sum of the bytes of every new storage created in the block, freed
    or not: it never decreases), and the ``largest`` single storage."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.total = self.largest = 0
        self.counted: set[int] = set()  # data pointers of the live storages created in the block

    def _freed(self, pointer: int, nbytes: int) -> None:
        self.counted.discard(pointer)
        self.live -= nbytes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None  # the storages of the arguments, found only when an output's storage is not a counted one
        for t in _tensors(out):
            storage = t.untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or pointer in self.counted:
                continue
            if inputs is None:
                inputs = {a.untyped_storage().data_ptr() for a in _tensors((args, kwargs))}
            if pointer not in inputs:  # a new storage
                self.counted.add(pointer)
                self.live += nbytes
                self.total += nbytes
                self.peak, self.largest = max(self.peak, self.live), max(self.largest, nbytes)
                weakref.finalize(storage, self._freed, pointer, nbytes)
        return out


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors in nested tuples (named ones and ``torch.return_types`` included), lists and dicts."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []


def peak_bytes(fn, *args, **kwargs) -> int:
    """The peak bytes of the tensors that ``fn(*args, **kwargs)`` creates."""
    with PeakTensorMemory() as memory:
        fn(*args, **kwargs)
    return memory.peak
