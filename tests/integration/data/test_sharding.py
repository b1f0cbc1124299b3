"""Each rank's share of every batch (lema.data.sharding): together, exactly one process's batches."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lema.data.examples import Example, batches
from lema.data.sharding import rank_batches, shard_bounds
from lema.errors import DataError


def examples(n: int) -> list[Example]:
    # Distinct first tokens identify the examples; lengths vary so padding differs per batch.
    return [Example(tuple([i + 1] + [7] * (2 + i % 5)), tuple([i + 1] + [7] * (2 + i % 5))) for i in range(n)]


@given(n=st.integers(0, 40), world=st.integers(1, 8))
def test_shard_bounds_cut_a_batch_into_contiguous_near_equal_parts_in_rank_order(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(DataError, match="rank 2"):
        shard_bounds(4, 2, 2)


def test_one_rank_yields_exactly_what_batches_yields():
    data = examples(11)
    ours = rank_batches(data, 3, 0, seq=5, seed=4, epochs=2)
    theirs = batches(data, 3, 0, seq=5, seed=4, epochs=2)
    for a, b in itertools.zip_longest(ours, theirs):
        assert a is not None and b is not None
        assert all(torch.equal(a[k], b[k]) for k in b)
        assert a["tokens"] == int(b["attention_mask"].sum())


@pytest.mark.parametrize("n,world,per_rank", [(12, 2, 2), (9, 2, 2), (10, 3, 1), (5, 4, 2)])
def test_the_ranks_rows_are_one_process_batches_in_order_with_its_token_counts(n, world, per_rank):
    data = examples(n)
    skip = 3
    single = list(itertools.islice(batches(data, per_rank * world, 0, seq=4, seed=1, epochs=None, skip=skip), 9))
    ranks = [list(itertools.islice(rank_batches(data, per_rank, 0, rank=r, world=world, seq=4, seed=1,
                                                epochs=None, skip=skip), 9)) for r in range(world)]
    saw_empty = False
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(world)]
        saw_empty |= any(p["input_ids"].shape[0] == 0 for p in parts)
        rows = [row[:int(m.sum())].tolist() for p in parts for row, m in zip(p["input_ids"], p["attention_mask"])]
        expected = [row[:int(m.sum())].tolist() for row, m in zip(whole["input_ids"], whole["attention_mask"])]
        assert rows == expected, step
        assert {p["tokens"] for p in parts} == {int(whole["attention_mask"].sum())}
    # A rank gets no rows exactly when an epoch's last batch is shorter than the number of ranks.
    assert saw_empty == (0 < n % (per_rank * world) < world)
