"""ResidentSource: every base weight held in host RAM (the RESIDENT strategy).

Each unit lives in one flat ``uint8`` buffer laid out exactly as a device slot
(:func:`~lema.domain.schedule.slot_layout.unit_layout`), allocated once at load, one
buffer per unit (so no single huge allocation, or pin, is ever needed). The buffers come
from an ``allocate`` callable: plain RAM by default, or the device's page-locked memory
(:meth:`lema.ports.device.Device.pinned_buffer`), in which case :meth:`host_unit` hands
the engine the buffer itself and uploads DMA straight out of it: no host copy per step.

Also the reference fake of the weight-source contract tests (like Hypothesis's
``InMemoryExampleDatabase``).

Example:
    >>> src = ResidentSource.from_safetensors(spec, "/models/tiny")   # doctest: +SKIP
    >>> src.read_unit(1)["mlp.up_proj.weight"].shape                   # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np
import torch

from lema.domain.model.spec import ModelSpec, torch_dtype
from lema.domain.schedule.slot_layout import unit_buffer_bytes, unit_layout, unit_views
from lema.errors import ConfigError, ModelFormatError

Allocate = Callable[[int], torch.Tensor]


def ram_buffer(nbytes: int) -> torch.Tensor:
    """A flat uint8 buffer in ordinary (pageable) RAM."""
    return torch.empty(nbytes, dtype=torch.uint8)


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    # One plain memcpy that releases the GIL; torch's copy_ would fan out over the intra-op
    # thread pool and fight the compute for the same cores.
    np.copyto(dst.numpy(), src.numpy())


_PAGE = 4096


class ResidentSource:
    """A :class:`~lema.ports.weights.WeightSource` over weights already in RAM.

    Args:
        spec: the model.
        tensors_by_unit: unit index -> {TensorSpec.key: tensor} for every unit of ``spec``;
            copied once into the source's own buffers.
        allocate: makes each unit's flat buffer (default: pageable RAM).
        pinned: the buffers ``allocate`` makes are page-locked (the device uploads from
            them directly; :meth:`host_unit` returns them).

    Raises:
        ModelFormatError: a unit or tensor is missing, or has the wrong dtype or shape
            (all offenders listed).
    """

    def __init__(self, spec: ModelSpec, tensors_by_unit: Mapping[int, Mapping[str, torch.Tensor]],
                 allocate: Allocate = ram_buffer, pinned: bool = False) -> None:
        problems = []
        for unit in spec.units:
            given = tensors_by_unit.get(unit.index, {})
            for t in unit.tensors:
                tensor = given.get(t.key)
                if tensor is None:
                    problems.append(f"unit {unit.index} misses {t.key}")
                elif tensor.dtype != torch_dtype(t.dtype) or tuple(tensor.shape) != t.shape:
                    problems.append(f"{t.name} is {tensor.dtype}{list(tensor.shape)}, spec says "
                                    f"{t.dtype}{list(t.shape)}")
        if problems:
            raise ModelFormatError(f"resident weights do not match the model: {'; '.join(problems[:8])}")

        def fill(index: int, buffer: torch.Tensor) -> None:
            for t, offset in unit_layout(spec.units[index]):
                raw = tensors_by_unit[index][t.key].contiguous().view(-1).view(torch.uint8)
                _copy_bytes(buffer[offset:offset + t.nbytes], raw)

        self._build(spec, fill, allocate, pinned)

    def _build(self, spec: ModelSpec, fill: Callable[[int, torch.Tensor], None], allocate: Allocate,
               pinned: bool) -> None:
        self.spec = spec
        self.pinned = pinned
        self.bytes_copied = 0  # host bytes copied out of the buffers by read_unit
        self._mapped_bytes = 0
        self._layouts = {u.index: unit_layout(u) for u in spec.units}
        self._buffers: dict[int, torch.Tensor] = {}
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        for unit in spec.units[1:]:
            buffer = allocate(unit_buffer_bytes(unit))
            if buffer.dtype != torch.uint8 or buffer.numel() < unit_buffer_bytes(unit):
                raise ConfigError(f"allocate: returned {buffer.dtype}[{buffer.numel()}], needs a uint8 buffer of "
                                  f"{unit_buffer_bytes(unit)} bytes")
            fill(unit.index, buffer)
            self._buffers[unit.index] = buffer
            self._views[unit.index] = unit_views(buffer, self._layouts[unit.index])
        # The embedding is gathered on the host and never uploaded: when every one of its
        # tensors is also in another unit (a tied head read from an HF folder), it is a view
        # of that copy instead of a second one.
        by_name = {t.name: self._views[u.index][t.key] for u in spec.units[1:] for t in u.tensors}
        embed = spec.units[0]
        if embed.tensors and all(t.name in by_name for t in embed.tensors):
            self._views[0] = {t.key: by_name[t.name] for t in embed.tensors}
        else:
            buffer = ram_buffer(unit_buffer_bytes(embed))
            fill(0, buffer)
            self._buffers[0] = buffer
            self._views[0] = unit_views(buffer, self._layouts[0])

    @classmethod
    def from_state_dict(cls, spec: ModelSpec, state_dict: Mapping[str, torch.Tensor],
                        allocate: Allocate = ram_buffer, pinned: bool = False) -> "ResidentSource":
        """From file tensor names -> tensors (as ``safetensors.torch.load_file`` returns)."""
        missing = sorted({t.name for u in spec.units for t in u.tensors} - set(state_dict))
        if missing:
            raise ModelFormatError(f"state dict misses {len(missing)} tensor(s), e.g. {missing[0]}")
        return cls(spec, {u.index: {t.key: state_dict[t.name] for t in u.tensors} for u in spec.units},
                   allocate=allocate, pinned=pinned)

    @classmethod
    def load(cls, source: object, allocate: Allocate = ram_buffer, pinned: bool = False) -> "ResidentSource":
        """Copy every unit of another weight source into RAM: each unit read once, straight
        into its buffer (positional reads when the source offers them)."""
        from lema.ports.weights import WeightSource

        if not isinstance(source, WeightSource):
            raise ConfigError(f"source: {type(source).__name__} is not a WeightSource")
        self = cls.__new__(cls)
        self._build(source.spec, lambda index, buffer: source.read_unit(index, buffer), allocate, pinned)
        return self

    @classmethod
    def from_safetensors(cls, spec: ModelSpec, root: str | os.PathLike[str], allocate: Allocate = ram_buffer,
                         pinned: bool = False) -> "ResidentSource":
        """Load a safetensors model (file or sharded folder) into RAM with positional reads."""
        from lema.adapters.weights.safetensors_source import SafetensorsSource

        with SafetensorsSource(spec, root) as source:
            return cls.load(source, allocate=allocate, pinned=pinned)

    @classmethod
    def shared_from_safetensors(cls, spec: ModelSpec, root: str | os.PathLike[str]) -> "ResidentSource":
        """Every weight as a view of the file's memory mapping, each page read in now.

        The pages live in the OS page cache, which every process mapping the same file
        shares: several ranks on one machine hold the weights once, not once each
        (``benchmarks/dp_host_memory.py`` measures it). The mapping is read-only and shared
        (no commit charge per model byte); the weights are never written, and a stray write
        faults instead of reaching the file. Under memory
        pressure the kernel may drop pages and read them again from the file (slower, still
        correct).
        """
        from lema.adapters.weights.safetensors_source import SafetensorsSource

        source = SafetensorsSource(spec, root, method="mmap")
        try:
            views = {u.index: source.read_unit(u.index) for u in spec.units}
        finally:
            source.close()  # the mappings live on with the tensors
        seen: dict[int, int] = {}
        for tensors in views.values():
            for t in tensors.values():
                if t.numel() and t.data_ptr() not in seen:
                    seen[t.data_ptr()] = t.numel() * t.element_size()
                    # One read per page faults it in now rather than during the first step.
                    int(t.reshape(-1).view(torch.uint8).numpy()[::_PAGE].sum())
        self = cls.__new__(cls)
        self.spec, self.pinned, self.bytes_copied = spec, False, 0
        self._layouts = {u.index: unit_layout(u) for u in spec.units}
        self._buffers = {}  # no copies: read_unit copies tensor by tensor out of the mapping
        self._views = views
        self._mapped_bytes = sum(seen.values())
        return self

    def read_unit(self, index: int, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :meth:`lema.ports.weights.WeightSource.read_unit` (no buffer: views of the RAM copy)."""
        if index not in self._views:
            raise IndexError(f"unit {index} out of range 0..{len(self.spec.units) - 1}")
        if buffer is None:
            return dict(self._views[index])
        need = unit_buffer_bytes(self.spec.units[index])
        if buffer.dtype != torch.uint8 or buffer.numel() < need or buffer.device.type != "cpu":
            raise ConfigError(f"buffer: needs a CPU uint8 tensor of at least {need} bytes for unit {index}")
        whole = self._buffers.get(index)
        if whole is not None:
            _copy_bytes(buffer[:need], whole[:need])
        else:
            for t, offset in self._layouts[index]:
                _copy_bytes(buffer[offset:offset + t.nbytes], self._views[index][t.key].reshape(-1).view(torch.uint8))
        self.bytes_copied += need
        return unit_views(buffer, self._layouts[index])

    def host_unit(self, index: int) -> torch.Tensor | None:
        """The unit's page-locked buffer, to upload from directly; None when not pinned."""
        if index not in self._views:
            raise IndexError(f"unit {index} out of range 0..{len(self.spec.units) - 1}")
        return self._buffers.get(index) if self.pinned and index > 0 else None

    @property
    def nbytes(self) -> int:
        """Host bytes held (a shared mapping's pages once)."""
        return sum(b.numel() for b in self._buffers.values()) + self._mapped_bytes

    def close(self) -> None:
        """Nothing to release: the buffers go with the object."""
