"""Peak tensor memory on any device, the CPU included, where PyTorch's allocator keeps no statistics.

:class:`PeakTensorMemory` does for tensors what ``tracemalloc`` does for Python objects. It is a
``TorchFunctionMode``, PyTorch's public hook that sees every call of a torch function: for each
tensor a call returns whose storage is new (not a view of an argument, not an in-place update), it
adds the storage's bytes to a running total, and a finaliser subtracts them when the storage is
freed. The peak of the total is the peak memory of the tensors created inside the ``with`` block;
temporaries inside a single operation (inside ``softmax``, say) are not seen.
"""
from __future__ import annotations

import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchFunctionMode):
    """Inside a ``with`` block: the bytes of tensor storage created there, ``live``, at ``peak``, and the
    ``largest`` single storage."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.counted: set[int] = set()  # data pointers of the live storages created in the block

    def _freed(self, pointer: int, nbytes: int) -> None:
        self.counted.discard(pointer)
        self.live -= nbytes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))} | self.counted
        for t in _tensors(out):
            storage = t.untyped_storage()
            if storage.data_ptr() not in known and storage.nbytes() > 0:  # a new storage
                self.counted.add(storage.data_ptr())
                self.live += storage.nbytes()
                self.peak, self.largest = max(self.peak, self.live), max(self.largest, storage.nbytes())
                weakref.finalize(storage, self._freed, storage.data_ptr(), storage.nbytes())
        return out


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def peak_bytes(fn, *args, **kwargs) -> int:
    """The peak bytes of the tensors that ``fn(*args, **kwargs)`` creates."""
    with PeakTensorMemory() as memory:
        fn(*args, **kwargs)
    return memory.peak
