"""Packing: several short examples in one sequence, each still computing what it computes alone.

Examples are taken in a seeded order and laid one after another into rows of at most
``seq`` tokens; a row is closed when the next example does not fit. Each example's
positions restart at 0 and the attention is block-diagonal (a token sees only the earlier
tokens of its own example: :func:`lema.domain.model.context.segment_ids`), and the last
token of an example does not predict the first of the next, so the loss of a packed batch
is the loss of its examples run one by one, with no compute spent on padding.

Example:
    >>> rows = pack_rows([3, 2, 4, 1], seq=5, seed=0, shuffle=False)
    >>> rows
    [(0,), (1,), (2, 3)]
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import attrs
import numpy as np
import torch

from lema.data.store import IGNORE_INDEX, TokenStore


def pack_rows(lengths: Sequence[int], seq: int, seed: int = 0, shuffle: bool = True) -> list[tuple[int, ...]]:
    """Example indices of each packed row: a seeded order, filled greedily up to ``seq``.

    Two examples share a row only when together they fit, so every example keeps all of
    its tokens; an example longer than ``seq`` (not produced by the data layer) is a row
    of its own.
    """
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(f"lema-pack-{seed}").shuffle(order)
    rows: list[tuple[int, ...]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if current and used + n > seq:
            rows.append(tuple(current))
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(tuple(current))
    return rows


@attrs.frozen
class PackedRow:
    """One packed sequence: the store and the examples laid into it."""

    store: TokenStore
    members: tuple[int, ...]

    def __len__(self) -> int:
        return sum(len(self.store.arrays(i)[0]) for i in self.members)


class PackedExamples(Sequence[PackedRow]):
    """The packed rows of a store (what :func:`lema.data.examples.batches` batches with
    ``collate_fn=collate_packed``)."""

    def __init__(self, store: TokenStore, seq: int, seed: int = 0) -> None:
        self.store, self.seq = store, seq
        self.rows = pack_rows(store.lengths(), seq, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PackedRow:  # type: ignore[override]
        return PackedRow(self.store, self.rows[index])

    @property
    def n_tokens(self) -> int:
        return self.store.n_tokens

    @property
    def efficiency(self) -> float:
        """Tokens over the row slots they fill (``len(rows) * seq``)."""
        return self.store.n_tokens / max(1, len(self.rows) * self.seq)


def collate_packed(rows: Sequence[PackedRow], pad_id: int, seq: int | None = None) -> dict[str, torch.Tensor]:
    """Packed rows -> ``input_ids``, ``labels`` (-100 off the loss and on padding),
    ``attention_mask`` (0 on padding) and ``position_ids`` (restarting at each example),
    right-padded to the longest row of the batch (not to ``seq``)."""
    arrays = []
    for row in rows:
        parts = [row.store.arrays(i) for i in row.members]
        ids = np.concatenate([p[0] for p in parts]).astype(np.int64)
        mask = np.concatenate([p[1] for p in parts]).astype(bool)
        positions = np.concatenate([np.arange(len(p[0]), dtype=np.int64) for p in parts])
        arrays.append((ids, mask, positions))
    length = max(len(a[0]) for a in arrays)
    out = {"input_ids": torch.full((len(rows), length), int(pad_id), dtype=torch.long),
           "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
           "position_ids": torch.zeros((len(rows), length), dtype=torch.long)}
    for r, (ids, mask, positions) in enumerate(arrays):
        n = len(ids)
        t = torch.from_numpy(ids)
        out["input_ids"][r, :n] = t
        out["labels"][r, :n] = torch.where(torch.from_numpy(mask), t, torch.full_like(t, IGNORE_INDEX))
        out["attention_mask"][r, :n] = 1
        out["position_ids"][r, :n] = torch.from_numpy(positions)
    return out


def describe(packed: PackedExamples) -> str:
    return (f"packed {len(packed.store):,} examples into {len(packed):,} rows of at most {packed.seq} tokens "
            f"({packed.efficiency:.0%} filled)")


def as_batches_input(data: Any, packing: bool, seq: int, seed: int) -> tuple[Sequence[Any], Any]:
    """``(items, collate_fn)`` for :func:`lema.data.examples.batches`: the packed rows of a
    store with :func:`collate_packed`, or the examples with the padded collate."""
    from lema.data.examples import collate

    if packing:
        return PackedExamples(data, seq, seed), collate_packed
    return data, collate
