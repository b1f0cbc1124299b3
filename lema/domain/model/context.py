"""Building a batch's :class:`~lema.domain.nn.context.BlockContext` from a model: its family's
attention layout (positions, rope tables, masks) and the adapters' scaling and dropout.

Example:
    >>> import torch
    >>> from lema.domain.model.spec import ModelSpec
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
    >>> spec = ModelSpec.from_config(cfg, dtype="F32")
    >>> ctx = make_context(spec, (2, 5), attention_mask=torch.tensor([[1] * 5, [0, 0, 1, 1, 1]]))
    >>> ctx.attention("full_attention")[0].lead   # left padding: no (batch, 1, seq, seq) mask
    (0, 2)
"""

from __future__ import annotations

import torch

from lema.domain.families import registry
from lema.domain.model.lora import LoraSpec
from lema.domain.model.spec import ModelSpec
from lema.domain.nn.context import (
    FULL,
    SLIDING,
    BlockContext,
    attention_kinds,
    attention_masks,
    decode_position_ids,
    split_padding,
    layout_ropes,
    packed_spans,
    sliding_keys_kept,
    training_mask,
)
from lema.domain.nn.layout import AttentionLayout
from lema.errors import ConfigError

__all__ = ["make_context", "make_decode_context"]


def make_context(spec: ModelSpec, input_shape: tuple[int, int], attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, lora: LoraSpec | None = None, training: bool = False,
                 dropout_seed: int | None = None, matmul_dtype: torch.dtype | None = None,
                 segments: torch.Tensor | None = None) -> BlockContext:
    """Build the per-batch context.

    Args:
        spec: the model.
        input_shape: ``(batch, seq)`` of the token ids.
        attention_mask: ``(batch, seq)`` 1 for tokens, 0 for padding; None means no padding.
        position_ids: ``(batch, seq)`` or ``(1, seq)``; default ``arange(seq)`` for every row,
            as transformers' ``*ForCausalLM`` models do with no cache.
        device: where the tables and masks live.
        dtype: compute dtype of the activations.
        lora: the adapters' spec (scaling, dropout); None for no adapters.
        training: apply LoRA dropout.
        dropout_seed: seed of the dropout masks; drawn from torch's global RNG when None.
        matmul_dtype: compute the frozen weights' products in this dtype (see
            :mod:`lema.domain.nn.matmul`); None: in ``dtype``.
        segments: ``(batch, seq)`` example numbers of packed rows (:func:`segment_ids`):
            attention stays inside each example; None: one example per row.

    Returns:
        The :class:`BlockContext`.

    Raises:
        ConfigError: when a mask, position or segment tensor does not have shape ``(batch, seq)``.
    """
    batch, seq = input_shape
    device = torch.device(device)
    params = registry.params_of(spec)
    layout: AttentionLayout = params.layout
    if position_ids is None:
        position_ids = torch.arange(seq, device=device)[None]
    if position_ids.shape[-1] != seq or position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch):
        raise ConfigError(f"position_ids has shape {list(position_ids.shape)}, expected [{batch}, {seq}]")
    position_ids = position_ids.to(device).expand(batch, seq)
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq):
        raise ConfigError(f"attention_mask has shape {list(attention_mask.shape)}, expected [{batch}, {seq}]")
    if segments is not None and tuple(segments.shape) != (batch, seq):
        raise ConfigError(f"segments has shape {list(segments.shape)}, expected [{batch}, {seq}]")
    # masks and segments are read on the host, once
    pad, lead = split_padding(attention_mask, device, packed=segments is not None)
    spans = packed_spans(segments, attention_mask if pad is None else None)
    masks = {kind: training_mask(pad, spans, batch, seq, layout.sliding_window if kind == SLIDING else None, device,
                                 segments=segments, lead=lead)
             for kind in attention_kinds(layout)}
    p = lora.dropout if (lora is not None and training) else 0.0
    if dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
    return BlockContext(dtype=dtype, position_ids=position_ids, ropes=layout_ropes(layout, position_ids, dtype),
                        masks=masks, params=params, lora_scaling=lora.scaling if lora is not None else 1.0,
                        lora_dropout=p, dropout_seed=dropout_seed, matmul_dtype=matmul_dtype)


def make_decode_context(spec: ModelSpec, batch: int, past_len: int, new_len: int,
                        attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        lora: LoraSpec | None = None, matmul_dtype: torch.dtype | None = None) -> BlockContext:
    """The context of ``new_len`` tokens following ``past_len`` cached ones (inference, no dropout).

    Queries are the new tokens; keys are the cached ones followed by the new ones. The masks
    are causal over that key axis (a new token sees every cached key and the new keys up to
    itself) and drop padded keys. Sliding-window layers cache only the keys a later query
    can see (:func:`sliding_keys_kept`), so their masks cover those and the new ones.
    ``past_len == 0`` is a prefill and gives the same context as :func:`make_context` except
    for the default positions.

    Args:
        spec: the model.
        batch: rows in the batch.
        past_len: tokens already in the KV cache.
        new_len: tokens in this step (the prompt for a prefill, 1 per generated token).
        attention_mask: ``(batch, past_len + new_len)``, 1 for tokens and 0 for padding (left
            padding: padded rows' real tokens are right-aligned); None means no padding.
        position_ids: ``(batch, new_len)`` or ``(1, new_len)``; default
            :func:`decode_position_ids` (transformers' ``generate`` numbering).
        device: where the tables and masks live.
        dtype: compute dtype of the activations.
        lora: the adapters' spec (their scaling); None for no adapters.

    Returns:
        The :class:`BlockContext`; its masks are ``(batch, 1, new_len, keys)`` or None (a
        prefill's are :func:`make_context`'s: None or a ``BlockSparse`` for left-padded prompts).

    Raises:
        ConfigError: a negative ``past_len``, ``new_len < 1``, or a mask or position tensor of
            the wrong shape.

    Example:
        >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        ...        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
        >>> spec = ModelSpec.from_config(cfg, dtype="F32")
        >>> ctx = make_decode_context(spec, 2, 4, 1, attention_mask=torch.tensor([[1] * 5, [0, 1, 1, 1, 1]]))
        >>> ctx.attention("full_attention")[0].shape, ctx.position_ids.tolist()
        (torch.Size([2, 1, 1, 5]), [[4], [3]])
    """
    problems = []
    if isinstance(past_len, bool) or not isinstance(past_len, int) or past_len < 0:
        problems.append(f"past_len={past_len!r} must be an integer >= 0")
    if isinstance(new_len, bool) or not isinstance(new_len, int) or new_len < 1:
        problems.append(f"new_len={new_len!r} must be an integer >= 1")
    if problems:
        raise ConfigError("make_decode_context: " + "; ".join(problems))
    total = past_len + new_len
    device = torch.device(device)
    params = registry.params_of(spec)
    layout: AttentionLayout = params.layout
    pad = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, total):
            raise ConfigError(f"attention_mask has shape {list(attention_mask.shape)}, expected [{batch}, {total}] "
                              "(cached + new tokens)")
        # read where the caller keeps it (the host, for generate), once: never a device tensor
        pad = None if bool(attention_mask.detach().bool().all()) else attention_mask.to(device).bool()
    if position_ids is None:
        position_ids = decode_position_ids(attention_mask, past_len, new_len, device)
    if position_ids.dim() != 2 or position_ids.shape[-1] != new_len or position_ids.shape[0] not in (1, batch):
        raise ConfigError(f"position_ids has shape {list(position_ids.shape)}, expected [{batch}, {new_len}]")
    position_ids = position_ids.to(device).expand(batch, new_len)
    window = layout.sliding_window
    if past_len == 0:  # a prefill: a training batch's masks (left-padded prompts: no dense mask)
        pad, lead = split_padding(attention_mask, device)
        masks = {kind: training_mask(pad, None, batch, new_len, window if kind == SLIDING else None, device, lead=lead)
                 for kind in attention_kinds(layout)}
    else:
        masks = {FULL: attention_masks(pad, new_len, None, device, past_len)}
        if SLIDING in layout.layer_types:
            masks[SLIDING] = attention_masks(pad, new_len, window, device, past_len,
                                             sliding_keys_kept(window, past_len))
    return BlockContext(dtype=dtype, position_ids=position_ids, ropes=layout_ropes(layout, position_ids, dtype),
                        masks=masks, params=params, lora_scaling=lora.scaling if lora is not None else 1.0,
                        matmul_dtype=matmul_dtype)
