"""Count the device -> host reads a computation makes (the waits a GPU would see).

``HostReads`` is a context manager that records every operation that needs the values of
a tensor on the host: ``tolist()`` and ``numpy()`` (seen as torch functions), and
``nonzero`` / ``_local_scalar_dense`` (``item()``, ``bool()``, ``int()``, ``float()``, a
one-argument ``torch.where``; seen at the dispatcher). On a CPU they cost nothing, on a GPU
each one waits for the device: a test counts them with this instead of timing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_FUNCTIONS = {"tolist", "numpy"}
_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::nonzero_static", "aten::unique", "aten::_unique2",
        "aten::masked_select", "aten::repeat_interleave"}


class _Functions(TorchFunctionMode):
    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _FUNCTIONS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        if name in _OPS and not (name == "aten::repeat_interleave" and len(args) > 1):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class HostReads:
    """``with HostReads() as reads: ...``; then ``reads.names`` lists what read the device."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._modes = (_Functions(self.names), _Ops(self.names))

    def __enter__(self) -> "HostReads":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def count(self) -> int:
        return len(self.names)
