"""Each rank's share of every batch, for data-parallel runs.

With ``N`` ranks of ``b`` sequences each, a step must see exactly the ``N * b`` sequences,
in the same order, that one process with batch ``N * b`` sees. So every rank walks the
same seeded order of *global* batches (:func:`lema.data.examples.batch_order` at
``N * b``) and takes its slice of each (:func:`shard_bounds`): ``b`` rows when the batch is
full; the last, shorter batch of an epoch is split as evenly as it goes, and a rank may get
no rows at all (it still takes part in the step).

Example:
    >>> shard_bounds(8, rank=1, world=2)
    (4, 8)
    >>> [shard_bounds(3, rank=r, world=2) for r in range(2)]
    [(0, 1), (1, 3)]
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from lema.data.examples import Example, batch_order, batches_per_epoch, collate
from lema.errors import DataError


def shard_bounds(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n_rows`` batch that ``rank`` of ``world`` trains on (contiguous,
    in rank order, sizes differing by at most one)."""
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is not in 0..{world - 1}")
    return n_rows * rank // world, n_rows * (rank + 1) // world


def rank_batches(examples: Sequence[Example] | Sequence[Any], batch_size: int, pad_id: int, *, rank: int = 0,
                 world: int = 1, seq: int | None = None, seed: int = 0, epochs: int | None = 1, shuffle: bool = True,
                 skip: int = 0, collate_fn: Callable[..., dict[str, torch.Tensor]] | None = None
                 ) -> Iterator[dict[str, torch.Tensor | int]]:
    """Yield this rank's rows of each global batch of ``batch_size * world`` examples.

    With ``world == 1`` this yields exactly what :func:`lema.data.examples.batches` yields.

    Args:
        examples: the examples (every rank holds all of them).
        batch_size: rows per rank (``--batch``).
        pad_id: the padding token id.
        rank, world: this rank and the number of ranks.
        seq, seed, epochs, shuffle: as :func:`lema.data.examples.batches`.
        skip: global batches to skip (resuming: steps x accumulation).
        collate_fn: makes a batch of items (default :func:`lema.data.examples.collate`; packed
            rows use :func:`lema.data.packing.collate_packed`).

    Yields:
        ``collate``'s dict (``input_ids``, ``labels``, ``attention_mask``; ``(0, 1)`` tensors
        when this rank has no rows) plus ``"tokens"``: the whole global batch's tokens, an int.
    """
    if batch_size < 1:
        raise DataError(f"batch size: {batch_size!r} must be >= 1")
    if not examples:
        raise DataError("no training examples to batch")
    global_batch = batch_size * world
    lengths = examples.lengths() if hasattr(examples, "lengths") else None  # a TokenStore knows them

    def length_of(i: int) -> int:
        return int(lengths[i]) if lengths is not None else _length(examples[i])

    per_epoch = batches_per_epoch(len(examples), global_batch)
    epoch, index = divmod(max(skip, 0), per_epoch)
    while epochs is None or epoch < epochs:
        for chunk in batch_order(len(examples), global_batch, seed, epoch, shuffle)[index:]:
            lo, hi = shard_bounds(len(chunk), rank, world)
            mine = [examples[i] for i in chunk[lo:hi]]
            batch: dict[str, torch.Tensor | int] = dict((collate_fn or collate)(mine, pad_id, seq)) if mine \
                else _empty()
            batch["tokens"] = sum(min(n, seq or n) for n in (length_of(i) for i in chunk))
            yield batch
        index = 0
        epoch += 1


def _length(item: Any) -> int:
    """Tokens of an example (or of a packed row)."""
    ids = getattr(item, "input_ids", None)
    return len(ids) if ids is not None else len(item)


def _empty() -> dict[str, torch.Tensor | int]:
    return {name: torch.zeros((0, 1), dtype=torch.long) for name in ("input_ids", "labels", "attention_mask")}
