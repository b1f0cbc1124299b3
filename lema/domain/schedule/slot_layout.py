"""The byte layout of a unit in a flat slot buffer, in one place: where each tensor sits, how
many bytes the unit and a slot take, and the typed views of a filled buffer.

Sources write a unit's bytes into a buffer at these offsets (``WeightSource.read_unit``),
devices upload those buffers whole, and the engine reads the tensors back through
:func:`unit_views`; so the layout is a pure function of the unit, on any device.

Example:
    >>> from lema.domain.model.spec import ModelSpec
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
    >>> unit = ModelSpec.from_config(cfg, dtype="F32").units[1]
    >>> [offset for _, offset in unit_layout(unit)][:3], unit_buffer_bytes(unit)
    ([0, 256, 16640], 164352)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from lema.domain.model.spec import LayerUnit, TensorSpec, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["SLOT_ALIGN", "slot_bytes", "unit_buffer_bytes", "unit_layout", "unit_views"]

# Every tensor starts at a multiple of this many bytes inside a slot (cache line / SIMD
# friendly, and a multiple of every dtype's size so ``view(dtype)`` is always legal).
SLOT_ALIGN = 64


def _align(n: int) -> int:
    return -(-n // SLOT_ALIGN) * SLOT_ALIGN


def unit_layout(unit: LayerUnit) -> tuple[tuple[TensorSpec, int], ...]:
    """Where each tensor of ``unit`` sits in a flat slot buffer: ``(tensor, byte offset)``.

    Tensors go in file order (so contiguous file ranges stay contiguous and are read in
    one call), each at an offset rounded up to :data:`SLOT_ALIGN` bytes.
    """
    ordered = sorted(unit.tensors, key=lambda t: (t.file, t.start)) if all(t.start >= 0 for t in unit.tensors) \
        else list(unit.tensors)
    out: list[tuple[TensorSpec, int]] = []
    offset = 0
    for t in ordered:
        out.append((t, offset))
        offset = _align(offset + t.nbytes)
    return tuple(out)


def unit_buffer_bytes(unit: LayerUnit) -> int:
    """Bytes of a flat buffer holding ``unit`` laid out by :func:`unit_layout`.

    Equals ``sum(align64(t.nbytes))`` over the unit's tensors, which is ``unit.nbytes``
    whenever every tensor's size is a multiple of 64 bytes (all real models).
    """
    return sum(_align(t.nbytes) for t in unit.tensors)


def slot_bytes(units: Sequence[LayerUnit]) -> int:
    """Bytes of one streaming slot (and of one host staging buffer): the largest unit."""
    return max((unit_buffer_bytes(u) for u in units), default=0)


def unit_views(buffer: torch.Tensor, layout: tuple[tuple[TensorSpec, int], ...]) -> dict[str, torch.Tensor]:
    """Typed views of a flat ``uint8`` buffer laid out by :func:`unit_layout` (any device)."""
    out = {}
    for t, offset in layout:
        out[t.key] = buffer[offset:offset + t.nbytes].view(torch_dtype(t.dtype)).view(t.shape)
    return out
