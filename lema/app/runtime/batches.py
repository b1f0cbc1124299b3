"""Turning what users pass as a batch (dicts, tuples, lists, tensors) into tensors."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from lema.errors import ConfigError


def as_batch(tensor: Any, name: str) -> torch.Tensor:
    """``(batch, seq)`` int64 ids (a 1-D input is one row).

    Token ids and labels must be integers: ``1.7`` is refused rather than cut to ``1``.
    An ``attention_mask`` may also be boolean, or floating point holding only 0 and 1.

    Raises:
        ConfigError: ragged lists, numbers out of int64's range, a wrong shape or dtype.
    """
    if not isinstance(tensor, torch.Tensor):
        try:
            tensor = torch.as_tensor(tensor)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ConfigError(f"{name}: not a (batch, seq) array of integers ({str(exc).splitlines()[0][:120]})") from None
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[1] == 0:
        raise ConfigError(f"{name}: expected shape (batch, seq), got {list(tensor.shape)}")
    if tensor.is_complex() or (tensor.is_floating_point() or tensor.dtype == torch.bool) and name != "attention_mask":
        raise ConfigError(f"{name}: expected integer token ids, got a {str(tensor.dtype).removeprefix('torch.')} "
                          "tensor; pass torch.long ids (e.g. from the tokenizer)")
    if tensor.is_floating_point() and not bool(((tensor == 0) | (tensor == 1)).all()):
        raise ConfigError(f"{name}: a floating-point mask must hold only 0 and 1")
    return tensor.long()


def batches_to_tensors(batches: Iterable[Any]) -> Iterable[tuple[torch.Tensor, Any, Any, Any]]:
    """Accept dicts with input_ids/labels/attention_mask(/position_ids), tuples, or bare
    tensors; yields ``(input_ids, labels, attention_mask, position_ids)``."""
    for batch in batches:
        if isinstance(batch, dict):
            yield batch["input_ids"], batch.get("labels"), batch.get("attention_mask"), batch.get("position_ids")
        elif isinstance(batch, (tuple, list)):
            yield (tuple(batch) + (None, None, None))[:4]
        else:
            yield batch, None, None, None
