"""Count the memory a computation allocates on the CPU, storage by storage.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op below
autograd, forward and backward alike (CPU backward runs in the calling thread, so the
thread-local mode covers it). For each op it counts the *new* storages among the
outputs: not a storage of an input (views and in-place ops), not one already counted.
``weakref.finalize`` on the storage uncounts it when it is freed, which covers tensors
autograd saved for backward (freed with the graph) and storages kept alive by views.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_paused = threading.local()


class paused:
    """Within this context, the current thread's allocations are not counted (explicit
    allocations that the device counts itself, e.g. :meth:`CpuDevice.alloc`)."""

    def __enter__(self) -> None:
        _paused.depth = getattr(_paused, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _paused.depth -= 1


def _storages(tree: Any, found: list[torch.UntypedStorage] | None = None) -> list[torch.UntypedStorage]:
    """The storages of the tensors in ``tree`` (tuples, lists and dicts of tensors and plain
    values: what aten ops take and return). A direct walk: this runs for every op, and
    ``torch.utils._pytree`` costs several times more per call."""
    if found is None:
        found = []
    if isinstance(tree, torch.Tensor):
        if tree.device.type != "meta":
            found.append(tree.untyped_storage())
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            if isinstance(item, (torch.Tensor, tuple, list, dict)):
                _storages(item, found)
    elif isinstance(tree, dict):
        for item in tree.values():
            if isinstance(item, (torch.Tensor, tuple, list, dict)):
                _storages(item, found)
    return found


class AllocationCounter(TorchDispatchMode):
    """Calls ``on_alloc(nbytes, what)`` for each new storage and ``on_free(nbytes)`` when it dies.

    ``on_alloc`` may raise (e.g. :class:`~lema.errors.DeviceOutOfMemory`); the storage is
    then not counted.
    """

    def __init__(self, on_alloc: Callable[[int, str], None], on_free: Callable[[int], None]) -> None:
        super().__init__()
        self._on_alloc = on_alloc
        self._on_free = on_free
        self._live: dict[int, int] = {}  # data_ptr -> nbytes of counted, living storages
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if getattr(_paused, "depth", 0):
            return out
        inputs = {s.data_ptr() for s in _storages((args, kwargs))}
        for storage in _storages(out):
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr == 0 or nbytes == 0 or ptr in inputs:
                continue
            with self._lock:
                if ptr in self._live:
                    continue
            self._on_alloc(nbytes, str(func))
            with self._lock:
                self._live[ptr] = nbytes
            weakref.finalize(storage, self._freed, ptr, nbytes)
        return out

    def _freed(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            if self._live.get(ptr) != nbytes:
                return
            del self._live[ptr]
        self._on_free(nbytes)

    @property
    def live_bytes(self) -> int:
        with self._lock:
            return sum(self._live.values())
