"""BlockContext: what every layer of one batch shares (positions, rope tables, masks, dropout).

Built once per batch by :func:`lema.domain.model.context.make_context` (or ``make_decode_context``
for tokens that follow a KV cache) from the family's :class:`~lema.domain.nn.layout.AttentionLayout`,
and passed to every block, so the blocks stay plain functions of ``(weights, adapters,
activations, context)``.

Masks follow transformers: causal, windowed on sliding-window layers (a window of W keeps
the W most recent keys, the query included, counted by sequence index), combined with the
``(batch, seq)`` padding mask; with no padding the mask is None and SDPA runs with
``is_causal=True``. A query row whose keys are all masked (a left-padded position) attends
to itself and its output is then zeroed, which is what PyTorch's SDPA returns for such
rows in transformers.

Packed rows (several examples in one sequence) carry ``segments``: the mask is then
block-diagonal causal, each token attending only to earlier tokens of its own example,
and the positions restart at 0 for each example (:func:`segment_ids` finds the examples
from such positions), so every example computes exactly what it computes alone.

No ``(seq, seq)`` mask is built for a training batch that is right-padded, packed or longer
than a sliding window (:func:`training_mask`): right padding runs plain causal attention
(padded positions come after every real token of their row, so no real token sees them,
and they carry no loss: only their own outputs differ), and packed rows and sliding
windows are a :class:`BlockSparse` description that attention runs segment by segment and
window band by window band (:func:`lema.domain.nn.attention.attend`), with masks of at most
``(window, 2 window)``. Left-padded rows are one example after a run of padding
(:attr:`BlockSparse.lead`): their real tokens attend causally among themselves, and the
padded positions, which see no key, output zeros, as transformers' SDPA path gives them.
Other padding (holes inside a row, left padding with packed rows) and decoding after a
cache keep the dense mask.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from lema.domain.nn.layout import FULL, SLIDING, AttentionLayout
from lema.domain.nn.rope import rope_tables
from lema.errors import ConfigError

__all__ = ["FULL", "SLIDING", "AttentionMask", "BlockContext", "BlockSparse", "attention_kinds", "attention_masks",
           "decode_position_ids", "layout_ropes", "packed_spans", "segment_ids", "sliding_keys_kept",
           "split_padding", "training_mask"]



@attrs.frozen(eq=False)
class BlockSparse:
    """Causal attention by blocks, with no ``(seq, seq)`` mask: per packed example, per window band.

    Attributes:
        batch, seq: the batch's shape (no cached keys: a training or prefill batch).
        spans: for each row, the ``(start, end)`` of each packed example (causal inside,
            nothing across); None: each row is one example.
        window: a sliding window (keys kept per query, the query included), or None.
        lead: for each row, how many positions of left padding come first (no query sees
            them; they see no key, and their outputs are zeros), or None: none. Not with
            ``spans``.
    """

    batch: int
    seq: int
    spans: tuple[tuple[tuple[int, int], ...], ...] | None = None
    window: int | None = None
    lead: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the dense mask it stands for."""
        return (self.batch, 1, self.seq, self.seq)

    def row_lead(self, row: int) -> int:
        """Positions of left padding at the start of ``row`` (zero outputs)."""
        return 0 if self.lead is None else self.lead[row]

    def row_spans(self, row: int) -> tuple[tuple[int, int], ...]:
        """The ``(start, end)`` of each example of ``row`` that attends (after its left padding)."""
        if self.spans is not None:
            return self.spans[row]
        lead = self.row_lead(row)
        return ((lead, self.seq),) if lead < self.seq else ()

    def dense(self, device: torch.device | str) -> torch.Tensor:
        """The boolean ``(batch, 1, seq, seq)`` mask it stands for (True attends): for the eager
        path (soft-capped scores) and for tests. A left-padded position attends to itself,
        as :func:`attention_masks` has it (its output is zeroed by :meth:`keep`)."""
        q = torch.arange(self.seq, device=device)[:, None]
        k = torch.arange(self.seq, device=device)[None, :]
        allowed = k <= q
        if self.window is not None:
            allowed = allowed & (k > q - self.window)
        out = allowed[None, None].expand(self.batch, 1, self.seq, self.seq)
        if self.lead is not None:
            first = torch.tensor(self.lead, device=device)[:, None, None, None]
            out = (out & (k >= first)) | ((q < first) & (q == k))
        if self.spans is None:
            return out
        same = torch.zeros(self.batch, self.seq, self.seq, dtype=torch.bool, device=device)
        for row in range(self.batch):
            for start, end in self.spans[row]:
                same[row, start:end, start:end] = True
        return out & same[:, None]


    def keep(self, device: torch.device | str) -> torch.Tensor | None:
        """The ``(batch, 1, seq, 1)`` multiplier that zeroes the left-padded positions' outputs
        (with :meth:`dense`), or None when no row is left-padded."""
        if self.lead is None:
            return None
        first = torch.tensor(self.lead, device=device)[:, None, None, None]
        return (torch.arange(self.seq, device=device)[None, None, :, None] >= first).to(torch.float32)


# A mask and the multiplier (1 keep / 0 zero) of its fully masked query rows, both optional;
# the mask may be a BlockSparse description instead of a tensor.
AttentionMask = tuple["torch.Tensor | BlockSparse | None", "torch.Tensor | None"]


def packed_spans(segments: torch.Tensor | None, attention_mask: torch.Tensor | None = None
                 ) -> tuple[tuple[tuple[int, int], ...], ...] | None:
    """Each row's ``(start, end)`` runs of equal segment ids (read on the host once), or None
    when no row holds more than one example. With a right-padding ``attention_mask`` the
    padding after a row's last token is one run (whatever its segment ids: it carries no loss
    and no token attends to it)."""
    if segments is None:
        return None
    seg = segments.detach().cpu()
    batch, seq = seg.shape
    breaks = (seg[:, 1:] != seg[:, :-1]).nonzero().tolist()
    if not breaks:
        return None
    ends = [seq] * batch
    if attention_mask is not None:
        ends = [min(seq, max(1, int(n))) for n in attention_mask.detach().cpu().long().sum(-1).tolist()]
    cuts: list[list[int]] = [[0] for _ in range(batch)]
    for row, col in breaks:
        if col + 1 < ends[row]:
            cuts[row].append(col + 1)
    for row in range(batch):
        if ends[row] < seq:
            cuts[row].append(ends[row])
    return tuple(tuple(zip(c, c[1:] + [seq])) for c in cuts)


def split_padding(attention_mask: torch.Tensor | None, device: torch.device, packed: bool = False
                  ) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    """``(pad, lead)``: the padding that needs a dense mask, as booleans on ``device`` (None
    when there is none or only right padding, see the module docstring), or the left
    padding of each row when every row is left-padded (real tokens after padding, ``lead``:
    its length per row; not for ``packed`` rows). One device -> host read of the mask when
    it lives on a device."""
    if attention_mask is None:
        return None, None
    real = attention_mask.detach().bool()
    flags = torch.stack([(real[:, 1:] <= real[:, :-1]).all(), (real[:, 1:] >= real[:, :-1]).all()]).long()
    right, left, *lead = torch.cat([flags, (~real).sum(-1)]).tolist()  # the one read
    if right:
        return None, None  # no padding, or right padding only
    if left and not packed:
        return None, tuple(lead)
    return real.to(device), None


def training_mask(pad: torch.Tensor | None, spans: tuple[tuple[tuple[int, int], ...], ...] | None, batch: int,
                  seq: int, window: int | None, device: torch.device,
                  segments: torch.Tensor | None = None, lead: tuple[int, ...] | None = None) -> AttentionMask:
    """The mask of one attention kind for a batch with no cached keys (training, a forward, a
    prefill): dense only for ``pad`` (:func:`split_padding`), else None (causal) or a
    :class:`BlockSparse` (packed ``spans`` from :func:`packed_spans`, a ``window`` shorter
    than ``seq``, left padding of ``lead`` positions per row)."""
    if pad is not None:
        return attention_masks(pad, seq, window, device, segments=None if segments is None else segments.to(device))
    windowed = window if window is not None and seq > window else None
    if spans is None and windowed is None and lead is None:
        return None, None
    return BlockSparse(batch, seq, spans, windowed, lead), None


@attrs.frozen(eq=False)
class BlockContext:
    """Per-batch values shared by every block.

    Attributes:
        dtype: the compute dtype of the activations.
        position_ids: ``(batch, seq)`` positions.
        ropes: attention kind -> ``(cos, sin)`` tables ``(batch, seq, rotary_dim)``; empty
            for learned positions.
        masks: attention kind -> ``(mask, keep)``: a boolean ``(batch, 1, seq, keys)`` mask
            (True attends) or None for plain causal, and a ``(batch, 1, seq, 1)`` multiplier
            that zeroes fully masked rows, or None.
        params: the family's parameters (``registry.params_of(spec)``), what its blocks read.
        lora_scaling: the adapters' output scale.
        lora_dropout: dropout probability on the adapters' input (0 outside training).
        dropout_seed: seeds each (layer, module) dropout mask, so recomputing a layer in the
            backward pass draws the same mask as its forward pass.
        matmul_dtype: dtype the frozen weights' products are computed in, when wider than
            ``dtype`` (see :mod:`lema.domain.nn.matmul`); None computes in ``dtype``.
        token_offset: the sequence position of the first token the blocks see (0; a tile's
            start under sequence tiling), part of the dropout masks' seeds.
    """

    dtype: torch.dtype
    position_ids: torch.Tensor
    ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[str, AttentionMask]
    params: Any
    lora_scaling: float = 1.0
    lora_dropout: float = 0.0
    dropout_seed: int = 0
    matmul_dtype: torch.dtype | None = None
    token_offset: int = 0

    def attention(self, kind: str) -> AttentionMask:
        """The ``(mask, keep)`` pair for a layer's attention kind."""
        return self.masks[kind]

    def rope_for(self, kind: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``(cos, sin)`` tables of an attention kind, or None (no rotary embedding)."""
        return self.ropes.get(kind)

    def tile(self, start: int, end: int) -> "BlockContext":
        """The context of positions ``start .. end`` (a sequence tile, :mod:`.tiling`): their
        positions and rope tables, the whole sequence's masks (attention runs whole), and
        ``token_offset = start`` so each tile draws its own LoRA dropout masks."""
        ropes = {kind: (cos[:, start:end], sin[:, start:end]) for kind, (cos, sin) in self.ropes.items()}
        return attrs.evolve(self, position_ids=self.position_ids[:, start:end], ropes=ropes, token_offset=start)


def sliding_keys_kept(window: int | None, past_len: int) -> int:
    """Cached keys a sliding-window layer keeps after ``past_len`` tokens: the ``window - 1``
    most recent (all a next query can see besides itself), as transformers'
    ``DynamicSlidingWindowLayer`` keeps them."""
    return past_len if window is None else min(past_len, window - 1)


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The example each token of packed rows belongs to, or None when no row is packed.

    A new example starts wherever a position is not the previous one plus 1 (positions
    restart at 0 for each packed example), the convention of transformers'
    ``DataCollatorWithFlattening``.

    Example:
        >>> segment_ids(torch.tensor([[0, 1, 2, 0, 1]])).tolist()
        [[1, 1, 1, 2, 2]]
        >>> segment_ids(torch.arange(4)[None]) is None
        True
    """
    if position_ids.dim() != 2:
        raise ConfigError(f"position_ids has shape {list(position_ids.shape)}, expected [batch, seq]")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    return starts.long().cumsum(-1)


def attention_masks(pad: torch.Tensor | None, seq: int, window: int | None, device: torch.device, past: int = 0,
          kept: int | None = None, segments: torch.Tensor | None = None) -> AttentionMask:
    # Queries are the last ``seq`` of ``past + seq`` positions; the keys are the ``kept`` cached
    # ones (the most recent, default all ``past``) followed by the new ones. ``pad`` is
    # ``(batch, past + seq)``. None stands for causal aligned to the last key: SDPA's
    # ``is_causal`` when there is no past, every key for a single query. ``segments`` is
    # ``(batch, seq)`` (no past): a token attends only to tokens of its own segment.
    kept = past if kept is None else kept
    start = past - kept
    if pad is None and segments is None and (seq == 1 and (window is None or kept < window)
                                             or past == 0 and (window is None or seq <= window)):
        return None, None
    q = torch.arange(past, past + seq, device=device)[:, None]
    k = torch.arange(start, past + seq, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[None, None]
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    if pad is None:
        return allowed, None
    allowed = allowed & pad[:, None, None, start:]
    # Rows with no visible key attend to themselves and are zeroed. Always built (a multiplier
    # of ones where no row is dead changes no value): asking whether any row is dead would
    # make the host wait for the device.
    dead = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | (dead & (q == k))
    return allowed, (~dead).to(torch.float32)


def layout_ropes(layout: AttentionLayout, position_ids: torch.Tensor, dtype: torch.dtype
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    table_dtype = None if layout.rope_fp32 else dtype
    return {kind: rope_tables(rope, position_ids, table_dtype) for kind, rope in layout.ropes
            if kind in layout.layer_types}


def attention_kinds(layout: AttentionLayout) -> set[str]:
    return set(layout.layer_types) | {FULL}


def decode_position_ids(attention_mask: torch.Tensor | None, past_len: int, new_len: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of the last ``new_len`` tokens, as transformers' ``generate`` numbers them.

    With a ``(batch, past_len + new_len)`` mask, a token's position is the number of real
    tokens before it (left padding does not count; padding itself gets 0); without one,
    ``past_len + arange(new_len)``.

    Example:
        >>> decode_position_ids(torch.tensor([[0, 1, 1], [1, 1, 1]]), 2, 1).tolist()
        [[1], [2]]
    """
    if attention_mask is None:
        return torch.arange(past_len, past_len + new_len, device=device)[None]
    mask = attention_mask.to(device).long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return positions[:, past_len:]

