"""Incremental decoding: a decoder layer that reads and extends a KV cache.

A generated token only needs its own activations to pass through a layer: the keys and
values of every earlier token are the same as when they were computed, so each layer keeps
them (:class:`KVCache`) and a decode step attends its new queries over ``past + new``.
:func:`decoder_block_cached` is :func:`lema.domain.model.blocks.decoder_block` with that cache; its
output equals the full recompute's last ``new`` positions.

The cache holds keys already rotated by rope, in the compute dtype, shaped
``(batch, kv_heads, cached, head_dim)`` (GPT-2: ``kv_heads == heads``), like transformers'
``DynamicCache``. A sliding-window layer keeps only the ``window - 1`` most recent keys and
values, all a later query can see besides itself (transformers'
``DynamicSlidingWindowLayer``), so its cache stops growing at the window.

Example:
    >>> import torch
    >>> from lema.domain.model.spec import ModelSpec
    >>> from lema.domain.model.context import make_decode_context
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100}
    >>> spec = ModelSpec.from_config(cfg, dtype="F32")
    >>> weights = {t.key: torch.randn(t.shape) * 0.02 for t in spec.units[1].tensors}
    >>> x, kv = decoder_block_cached(spec, weights, None, torch.randn(2, 7, 64), make_decode_context(spec, 2, 0, 7))
    >>> y, kv = decoder_block_cached(spec, weights, None, torch.randn(2, 1, 64), make_decode_context(spec, 2, 7, 1),
    ...                              past=kv)
    >>> y.shape, kv[0].shape
    (torch.Size([2, 1, 64]), torch.Size([2, 4, 8, 16]))
"""

from __future__ import annotations

from typing import Sequence

import attrs
import torch

from lema.domain.model.blocks import Adapters, Weights, decoder_block_kv
from lema.domain.nn.context import SLIDING, BlockContext, sliding_keys_kept
from lema.domain.model.spec import ModelSpec
from lema.errors import ConfigError

KV = tuple[torch.Tensor, torch.Tensor]


@attrs.frozen(eq=False)
class KVCache:
    """Every decoder layer's cached keys and values (None for a layer not computed yet).

    Attributes:
        layers: per layer ``(keys, values)``, each ``(batch, kv_heads, cached, head_dim)``
            (``cached`` is ``past_len``, or at most ``window - 1`` on a sliding-window layer).
        past_len: the tokens the cache stands for (advanced by :meth:`advanced`).
    """

    layers: tuple[KV | None, ...]
    past_len: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        """A cache with nothing in it, for a model of ``n_layers`` decoder layers."""
        return cls((None,) * n_layers)

    @classmethod
    def from_layers(cls, layers: Sequence[KV | None], past_len: int) -> "KVCache":
        return cls(tuple(layers), past_len)

    def advanced(self, new_len: int) -> "KVCache":
        """The same cache, standing for ``new_len`` more tokens (after every layer took them)."""
        return attrs.evolve(self, past_len=self.past_len + new_len)

    @property
    def nbytes(self) -> int:
        """Bytes of every cached tensor."""
        return sum(t.numel() * t.element_size() for kv in self.layers if kv is not None for t in kv)

    def past(self, layer: int) -> KV | None:
        """Layer ``layer``'s ``(keys, values)``, or None when it has none yet."""
        return self.layers[layer]

    def with_layer(self, layer: int, kv: KV) -> "KVCache":
        """A cache with layer ``layer``'s entry replaced by ``kv``."""
        layers = list(self.layers)
        layers[layer] = kv
        return attrs.evolve(self, layers=tuple(layers))


def decoder_block_cached(spec: ModelSpec, weights: Weights, lora: Adapters | None, x: torch.Tensor,
                         ctx: BlockContext, layer: int = 0, past: KV | None = None) -> tuple[torch.Tensor, KV]:
    """One decoder layer over new tokens that follow ``past`` cached ones.

    Args:
        spec: the model.
        weights: the layer's tensors by in-unit key, any dtype.
        lora: ``module_key -> (A, B)`` for this layer, or None.
        x: ``(batch, new, hidden)`` activations of the new tokens, in ``ctx.dtype``.
        ctx: :func:`lema.domain.model.context.make_decode_context` for ``past_len`` cached and
            ``new`` new tokens.
        layer: 0-based layer index.
        past: this layer's cached ``(keys, values)``, ``(batch, kv_heads, cached, head_dim)``;
            None for a prefill.

    Returns:
        ``(x_out, (keys, values))``: ``(batch, new, hidden)`` and the layer's keys and values
        for the next step: all ``past_len + new`` tokens, or on a sliding-window layer the
        ``window - 1`` most recent.

    Raises:
        ConfigError: ``past`` does not match the new keys' batch, heads or head size, or
            ``ctx`` was built for a different number of cached tokens.
    """
    present: list[KV] = []
    layout = ctx.params.layout

    def extend(k: torch.Tensor, v: torch.Tensor) -> KV:
        if past is not None:
            pk, pv = past
            if pk.shape[:2] != k.shape[:2] or pk.shape[3] != k.shape[3] or pv.shape != pk.shape:
                raise ConfigError(f"layer {layer}: cached keys {list(pk.shape)} / values {list(pv.shape)} do not "
                                  f"match the new keys {list(k.shape)} (batch, kv_heads, seq, head_dim)")
            k = torch.cat((pk.to(k.dtype), k), dim=2)
            v = torch.cat((pv.to(v.dtype), v), dim=2)
        kind = layout.layer_types[layer]
        mask = ctx.attention(kind)[0]
        if mask is not None and mask.shape[-1] != k.shape[2]:
            raise ConfigError(f"layer {layer}: the context's mask covers {mask.shape[-1]} keys but the cache and "
                              f"the new tokens make {k.shape[2]}; build it with make_decode_context(past_len="
                              f"{k.shape[2] - x.shape[1]})")
        if kind == SLIDING:
            drop = k.shape[2] - sliding_keys_kept(layout.sliding_window, k.shape[2])
            # a copy, so the dropped keys' memory goes (a view would keep all of it)
            present.append((k[:, :, drop:].clone(), v[:, :, drop:].clone()) if drop else (k, v))
        else:
            present.append((k, v))
        return k, v

    out = decoder_block_kv(spec, weights, lora, x, ctx, layer, extend)
    return out, present[0]
