"""Packed rows in the core: segments from restarting positions, and block-diagonal causal
attention that makes every packed example compute what it computes alone (transformers
run on each example alone is the reference)."""

from __future__ import annotations

import pytest
import torch

from lema.domain.model.blocks import decoder_block, embed
from lema.domain.model.context import make_context
from lema.domain.nn.context import BlockSparse, segment_ids
from lema.domain.model.heads import head_logits
from tests.tiny_models import KINDS, build_hf_model, spec_of, unit_weights
from tests.tolerance import assert_close, forward_floor, logits_noise

LENGTHS = (5, 7, 4)  # three examples packed into one row of 16


def test_segments_start_where_positions_restart():
    assert segment_ids(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])).tolist() == \
        [[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1]]
    assert segment_ids(torch.arange(6)[None].expand(2, 6)) is None


def test_the_mask_is_block_diagonal_and_causal():
    spec = spec_of(build_hf_model("llama"))
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    ctx = make_context(spec, (1, 5), position_ids=positions, segments=segment_ids(positions))
    mask, keep = ctx.attention("full_attention")
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]],
                            dtype=torch.bool)
    assert isinstance(mask, BlockSparse) and mask.spans == (((0, 3), (3, 5)),) and keep is None  # no (seq, seq) mask
    assert torch.equal(mask.dense("cpu")[0, 0], expected)


def _lema_logits(spec, units, ids, positions, mask=None):
    ctx = make_context(spec, tuple(ids.shape), attention_mask=mask, position_ids=positions,
                       segments=segment_ids(positions))
    x = embed(spec, units[0], ids, ctx)
    for i in range(spec.n_layers):
        x = decoder_block(spec, units[i + 1], None, x, ctx, layer=i)
    return head_logits(spec, units[-1], x)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_logits_equal_each_example_run_alone_in_transformers(kind):
    """fp32, within the tolerance rule, for every family (Mistral's sliding window included), with padding."""
    model = build_hf_model(kind, seed=2)
    spec = spec_of(model)
    units = unit_weights(spec, model.state_dict())
    gen = torch.Generator().manual_seed(5)
    examples = [torch.randint(0, spec.vocab_size, (n,), generator=gen) for n in LENGTHS]
    row = torch.cat(examples)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    # Two rows: the packed one, and one example followed by padding.
    ids = torch.stack([row, torch.cat([examples[1], torch.zeros(len(row) - LENGTHS[1], dtype=torch.long)])])
    pos = torch.stack([positions, torch.cat([torch.arange(LENGTHS[1]), torch.zeros(len(row) - LENGTHS[1],
                                                                                   dtype=torch.long)])])
    mask = torch.ones_like(ids)
    mask[1, LENGTHS[1]:] = 0
    floor = forward_floor(spec, len(row))
    with torch.no_grad():
        packed = _lema_logits(spec, units, ids, pos, mask)
        start = 0
        for example in examples:
            alone = model(input_ids=example[None]).logits[0]
            got = packed[0, start:start + len(example)]
            assert_close(got, alone, noise=logits_noise(model, example[None]), floor=floor, what=kind)
            start += len(example)
        alone = model(input_ids=examples[1][None]).logits[0]
        assert_close(packed[1, :LENGTHS[1]], alone, noise=logits_noise(model, examples[1][None]), floor=floor)
