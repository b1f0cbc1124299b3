"""Grouped-query self-attention: rotary embedding, KV hook, SDPA or eager scores with soft-capping.

:func:`self_attention` is what every family's attention does once it has its q, k and v:
rotate q and k by the layer kind's tables, hand the new keys and values to the KV hook
(the decode cache), and attend. Without soft-capping it runs PyTorch's SDPA (as
transformers' ``sdpa`` path); with it (Gemma 2) it computes the scores eagerly, caps them
with ``tanh(s / cap) * cap`` before the mask and softmaxes in fp32, as transformers'
``eager`` path does.

Example:
    >>> import torch
    >>> from lema.domain.nn.context import BlockContext
    >>> ctx = BlockContext(dtype=torch.float32, position_ids=torch.zeros(1, 3, dtype=torch.long), ropes={},
    ...                    masks={"full_attention": (None, None)}, params=None)
    >>> q = k = v = torch.randn(1, 3, 2, 4)
    >>> self_attention(q, k, v, ctx, "full_attention", scale=0.5).shape
    torch.Size([1, 3, 8])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from lema.domain.nn.context import BlockSparse
from lema.domain.nn.rope import apply_rope

if TYPE_CHECKING:
    from lema.domain.nn.context import BlockContext

# Called with a layer's new keys and values (after rope), ``(batch, kv_heads, seq, head_dim)``;
# returns the keys and values to attend over (e.g. the KV cache's past ones prepended).
KVHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _causal(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """Causal mask with the queries aligned to the last keys (what SDPA's is_causal means for q == k)."""
    q = torch.arange(keys - queries, keys, device=device)[:, None]
    return (torch.arange(keys, device=device)[None, :] <= q)[None, None]


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None,
           scale: float, softcap: float | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = mask if mask is not None else _causal(q.shape[2], k.shape[2], q.device)
    if keep is not None:
        # transformers' eager path gives a query with no visible key (a left-padded position)
        # the same score for every key: a uniform average over all of them.
        allowed = allowed & (keep != 0)
    # Added, not filled, as transformers does: the same values, and the same gradient on those rows.
    scores = scores + torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(
        ~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA of equally long q and k (grouped-query heads shared, no mask built)."""
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)


def _banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float) -> torch.Tensor:
    """Causal attention of one example (q, k, v over the same positions), within ``window``:
    whole when it fits the window, else band by band, each ``window`` queries against the
    keys they can see, with a ``(window, 2 window)`` mask at most."""
    n = q.shape[2]
    if window is None or n <= window:
        return _sdpa_causal(q, k, v, scale)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    parts = []
    for start in range(0, n, window):
        end = min(start + window, n)
        first = max(0, start - window + 1)
        rows = torch.arange(start, end, device=q.device)[:, None]
        cols = torch.arange(first, end, device=q.device)[None, :]
        band = (cols <= rows) & (cols > rows - window)
        parts.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, first:end], v[:, :, first:end],
                                                    attn_mask=band, scale=scale))
    return torch.cat(parts, dim=2)


def _block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparse, scale: float) -> torch.Tensor:
    """Attention under a :class:`BlockSparse` description: per packed example, per window band;
    a row's left padding outputs zeros."""
    if mask.spans is None and mask.lead is None:
        return _banded(q, k, v, mask.window, scale)
    rows = []
    for row in range(q.shape[0]):
        qr, kr, vr = q[row:row + 1], k[row:row + 1], v[row:row + 1]
        lead = mask.row_lead(row)
        parts = [qr.new_zeros(1, q.shape[1], lead, v.shape[-1])] if lead else []
        parts += [_banded(qr[:, :, a:b], kr[:, :, a:b], vr[:, :, a:b], mask.window, scale)
                  for a, b in mask.row_spans(row)]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: "BlockContext", kind: str, scale: float,
           softcap: float | None = None) -> torch.Tensor:
    """Attention over ``(batch, heads, seq, head_dim)`` tensors; returns ``(batch, seq, heads * head_dim)``.

    ``k`` and ``v`` may have fewer heads (grouped-query attention: kv head ``j`` serves query
    heads ``j * g .. j * g + g - 1``). The mask is ``ctx``'s for the attention ``kind``.
    """
    mask, keep = ctx.attention(kind)
    groups = q.shape[1] // k.shape[1]
    if isinstance(mask, BlockSparse):
        if softcap is None and mask.seq == q.shape[2] == k.shape[2]:
            return _block_sparse(q, k, v, mask, scale).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        # the eager path (soft-capped scores) takes the mask whole
        mask, keep = mask.dense(q.device), mask.keep(q.device)
    if softcap is not None:
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = _eager(q, k, v, mask, keep, scale, softcap)
    else:
        kwargs = {}
        if groups > 1 and mask is None:
            kwargs["enable_gqa"] = True
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # No mask means causal; with a single query row (a cached decode step) that is every key,
        # and SDPA's ``is_causal`` would align it to the first key instead.
        causal = mask is None and q.shape[2] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kwargs)
        if keep is not None:
            out = out * keep.to(out.dtype)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class AttentionTap:
    """Passed as a block's ``kv_hook``, it takes over the layer's attention: it receives the
    rotated ``q, k, v`` of the block's tokens (``(batch, heads, n, head_dim)``) and the
    layer's attention (a function of whole-sequence ``q, k, v``) and returns the attention
    output of those tokens. :mod:`lema.domain.model.tiling` runs a family's block over
    sequence tiles with it; the block's code stays the family's own."""

    def tap(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            attend_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("an AttentionTap replaces the attention; it is not a KV hook")


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: "BlockContext", kind: str, *,
                   scale: float, kv_hook: KVHook | None = None, softcap: float | None = None) -> torch.Tensor:
    """Rotary embedding, KV hook and attention for one layer.

    Args:
        q: ``(batch, seq, heads, head_dim)``; k, v: ``(batch, seq, kv_heads, head_dim)``.
        ctx: the batch context (rope tables and masks per attention kind).
        kind: the layer's attention kind (``"full_attention"`` / ``"sliding_attention"``).
        scale: the scores' factor (``head_dim ** -0.5``, or the family's own).
        kv_hook: receives the rotated keys and values, returns those to attend over; an
            :class:`AttentionTap` instead receives q, k, v and returns the attention output.
        softcap: cap the scores with ``tanh(s / softcap) * softcap`` (eager path).

    Returns:
        ``(batch, seq, heads * head_dim)`` in ``q``'s dtype.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    tables = ctx.rope_for(kind)
    if tables is not None:
        q, k = apply_rope(q, k, *tables)
    if isinstance(kv_hook, AttentionTap):
        return kv_hook.tap(q, k, v, lambda q_, k_, v_: attend(q_, k_, v_, ctx, kind, scale, softcap))
    if kv_hook is not None:
        k, v = kv_hook(k, v)
    return attend(q, k, v, ctx, kind, scale, softcap)
