"""The model's layers as plain functions, dispatched to the spec's family.

Every function takes the model's :class:`~lema.domain.model.spec.ModelSpec`, a dict of
one unit's weights (keyed by in-unit key, e.g. ``self_attn.q_proj.weight``), the layer's
LoRA adapters (``module_key -> (A, B)``, or None) and the activations. No module object
outlives a call, so one layer's adapters can never leak into another's. The math itself
is the family's (:mod:`lema.domain.families`), built on the shared pieces of this package
(:mod:`.linear`, :mod:`.attention`, :mod:`.norms`, :mod:`.rope`, :mod:`.moe`), and
mirrors transformers 5 and PEFT's ``lora.Linear``, so outputs and LoRA gradients match
them.

The frozen base model's own dropouts (GPT-2's ``embd_pdrop``/``attn_pdrop``/``resid_pdrop``,
the Llama family's ``attention_dropout``) are not applied: only LoRA dropout is, so training
matches transformers with those set to 0 (:func:`lema.domain.families.registry.base_dropouts`
lists them; the model warns when they are not zero).

Example:
    >>> import torch
    >>> from lema.domain.model.spec import ModelSpec
    >>> from lema.domain.model.context import make_context
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100}
    >>> spec = ModelSpec.from_config(cfg, dtype="F32")
    >>> weights = {t.key: torch.randn(t.shape) * 0.02 for t in spec.units[1].tensors}
    >>> ctx = make_context(spec, (2, 7))
    >>> decoder_block(spec, weights, None, torch.randn(2, 7, 64), ctx).shape
    torch.Size([2, 7, 64])
"""

from __future__ import annotations

import torch

from lema.domain.families import registry
from lema.domain.nn.attention import KVHook
from lema.domain.nn.context import BlockContext
from lema.domain.nn.linear import Adapters, Weights, linear
from lema.domain.nn.norms import activation, rms_norm
from lema.domain.model.spec import ModelSpec

__all__ = ["Adapters", "KVHook", "Weights", "activation", "decoder_block", "decoder_block_kv", "embed", "linear",
           "rms_norm"]


def embed(spec: ModelSpec, weights: Weights, input_ids: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    """The embedding output ``(batch, seq, hidden)`` in ``ctx.dtype`` (token embeddings, the
    family's scaling or learned positions)."""
    fam = registry.family(spec.family)
    return fam.embed(ctx.params, weights, input_ids, ctx.position_ids.to(input_ids.device), ctx.dtype)


def decoder_block(spec: ModelSpec, weights: Weights, lora: Adapters | None, x: torch.Tensor,
                  ctx: BlockContext, layer: int = 0) -> torch.Tensor:
    """One decoder layer: ``x_out = block(x)``.

    Args:
        spec: the model.
        weights: the layer's tensors by in-unit key (``spec.units[layer + 1]``), any dtype.
        lora: ``module_key -> (A, B)`` for this layer (``LoraState.layer(layer)``) or None.
        x: ``(batch, seq, hidden)`` activations in ``ctx.dtype``.
        ctx: the batch context from :func:`lema.domain.model.context.make_context`.
        layer: 0-based layer index (its attention kind, MoE or dense MLP, GPT-2's
            inverse-layer scaling, and the seed of its LoRA dropout masks).

    Returns:
        ``(batch, seq, hidden)`` in ``x``'s dtype.
    """
    return registry.family(spec.family).block(ctx.params, weights, lora, x, ctx, layer)


def decoder_block_kv(spec: ModelSpec, weights: Weights, lora: Adapters | None, x: torch.Tensor,
                     ctx: BlockContext, layer: int, kv_hook: KVHook) -> torch.Tensor:
    """:func:`decoder_block` with a hook between the key/value projections and attention.

    ``kv_hook(k, v)`` receives this call's keys (rotated, where the family uses rope) and
    values, ``(batch, kv_heads, seq, head_dim)`` in ``x``'s dtype, and returns the keys and
    values to attend over; :mod:`lema.domain.model.decode` uses it to prepend a layer's KV
    cache. The queries are this call's ``seq`` positions, so ``ctx`` must carry masks of
    shape ``(batch, 1, seq, keys)`` (:func:`lema.domain.model.context.make_decode_context`).

    Returns:
        ``(batch, seq, hidden)`` in ``x``'s dtype.
    """
    return registry.family(spec.family).block(ctx.params, weights, lora, x, ctx, layer, kv_hook)
