"""WeightSource: where the frozen base weights come from, one unit at a time.

Adapters: :class:`lema.adapters.weights.safetensors_source.SafetensorsSource` (mmap / positional
reads from one file or a sharded folder) and
:class:`lema.adapters.weights.resident_source.ResidentSource` (everything in RAM; also the
reference fake of the contract tests).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lema.domain.model.spec import ModelSpec


@runtime_checkable
class WeightSource(Protocol):
    """Unit index -> named tensors, or raw bytes into a caller's buffer.

    Attributes:
        spec: the model the source serves; ``spec.units[i]`` describes unit ``i``.
        bytes_copied: host bytes written into callers' buffers so far (each read of a unit
            into a buffer counts its bytes once: how much host copying the source did).
    """

    spec: ModelSpec
    bytes_copied: int

    def read_unit(self, index: int, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The tensors of unit ``index``, keyed by :attr:`TensorSpec.key`.

        Args:
            index: unit index (0 embedding, 1..L decoders, L+1 head).
            buffer: optional flat ``uint8`` CPU tensor of at least
                :func:`lema.domain.schedule.slot_layout.unit_buffer_bytes` bytes. When given, the unit's
                bytes are written into it laid out by :func:`lema.domain.schedule.slot_layout.unit_layout`
                and the returned tensors are views of it. When omitted, the source returns
                tensors it may share with others (mmap-backed views, or its RAM copies):
                callers must not modify them.

        Raises:
            IndexError: no such unit. ModelFormatError: the file is shorter than its header says.
        """
        ...

    def host_unit(self, index: int) -> torch.Tensor | None:
        """The unit's bytes as one flat host buffer the device can upload from directly
        (page-locked, laid out by ``unit_layout``), or None when the source has none and the
        unit must be read into a staging buffer."""
        ...

    def close(self) -> None:
        """Release files and mappings; tensors returned without a buffer may stop being valid."""
        ...
