"""Non-finite (NaN or infinite) weights are named where they are read, not found at a loss.

A base model, an adapter or an optimizer state holding NaN or inf trains to NaN, generates
nothing, or is copied on silently. Each unit is checked once per model, on the device it
computes on, by summing it in float32 chunks (a reduction: no copy of the tensor, one
number back per chunk); a sum is NaN or infinite exactly when an element is (weights are
far too small for a float32 sum of them to overflow).

Example:
    >>> import torch
    >>> first_non_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])})
    'b'
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import torch

from lema.errors import ModelFormatError

if TYPE_CHECKING:
    from lema.domain.model.spec import ModelSpec

# Elements summed at once: bounds the float32 temporary a reduction may make (16 MiB).
CHUNK = 1 << 22


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of a floating tensor is finite (other dtypes always are)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    flat = tensor.detach().reshape(-1)
    for begin in range(0, flat.numel(), CHUNK):
        if not math.isfinite(float(flat[begin:begin + CHUNK].sum(dtype=torch.float32))):
            return False
    return True


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The key of the first tensor holding NaN or inf, or None."""
    for key, tensor in tensors.items():
        if not is_finite(tensor):
            return key
    return None


def check_unit_finite(spec: ModelSpec, unit: int, weights: Mapping[str, torch.Tensor]) -> int:
    """``unit``, once its weights are found finite; else raise naming the file and tensor.

    Raises:
        ModelFormatError: a weight of the unit is not finite.
    """
    key = first_non_finite(weights)
    if key is None:
        return unit
    t = next((t for t in spec.units[unit].tensors if t.key == key), None)
    name, file = (t.name, t.file or "the model") if t is not None else (key, "the model")
    raise ModelFormatError(f"{file}: tensor {name} holds NaN or infinite values; the weights are corrupt: "
                           "re-download or re-convert the model")
