"""Turning what users pass as a batch (dicts, tuples, lists, tensors) into tensors."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from lema.errors import ConfigError


def as_batch(tensor: Any, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(tensor)
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[1] == 0:
        raise ConfigError(f"{name}: expected shape (batch, seq), got {list(tensor.shape)}")
    return tensor.long()


def batches_to_tensors(batches: Iterable[Any]) -> Iterable[tuple[torch.Tensor, Any, Any]]:
    """Accept dicts with input_ids/labels/attention_mask, tuples, or bare tensors."""
    for batch in batches:
        if isinstance(batch, dict):
            yield batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
        elif isinstance(batch, (tuple, list)):
            yield (tuple(batch) + (None, None))[:3]
        else:
            yield batch, None, None
