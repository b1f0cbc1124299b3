"""A batch's context never reads a device tensor's values (issue 23: ``bool()`` of device
tensors made the host wait once per batch and mask kind). The inputs a caller hands in
(attention mask, segments) are read on the host, once; everything made on the device stays
there. ``device="meta"`` stands for a GPU: reading a meta tensor's values raises."""

from __future__ import annotations

import pytest
import torch

from lema.domain.model.context import make_context, make_decode_context
from lema.domain.nn.context import segment_ids
from tests.host_reads import HostReads
from tests.tiny_models import build_hf_model, spec_of


@pytest.fixture(scope="module")
def specs():
    return {kind: spec_of(build_hf_model(kind)) for kind in ("llama", "mistral")}


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("padding", [None, "right", "left"])
@pytest.mark.parametrize("packed", [False, True])
def test_a_training_context_on_a_device_reads_only_the_host_inputs(specs, kind, padding, packed):
    spec = specs[kind]
    batch, seq = 2, 12
    mask = None
    if padding is not None:
        mask = torch.ones(batch, seq, dtype=torch.long)
        if padding == "right":
            mask[1, -3:] = 0
        else:
            mask[1, :3] = 0
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(seq))]) if packed else None
    segments = segment_ids(positions) if packed else None
    with HostReads() as reads:
        ctx = make_context(spec, (batch, seq), attention_mask=mask, position_ids=positions, segments=segments,
                           device="meta")
    assert ctx.position_ids.device.type == "meta"
    # the host inputs, read once per batch (not once per attention kind)
    assert reads.count <= (1 if mask is not None else 0) + (2 if packed else 0) + (1 if packed and mask is not None
                                                                                  else 0), reads.names


def test_a_decode_context_on_a_device_reads_nothing(specs):
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    ctx = make_decode_context(specs["llama"], 2, 4, 1, attention_mask=mask, device="meta")
    m, keep = ctx.attention("full_attention")
    assert m.device.type == "meta" and keep is not None
