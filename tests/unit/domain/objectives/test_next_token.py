"""Next-token cross-entropy, the first objective: the head's chunked loss, transformers' loss."""

from __future__ import annotations

import pytest
import torch

from lema.domain.model import heads
from lema.domain.model.spec import ModelSpec
from lema.domain.objectives.next_token import NEXT_TOKEN

CONFIG = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
          "intermediate_size": 64, "vocab_size": 50}


def test_next_token_is_the_heads_chunked_cross_entropy_and_needs_no_extra_pass():
    spec = ModelSpec.from_config(CONFIG, dtype="F32")
    gen = torch.Generator().manual_seed(0)
    head = {t.key: torch.randn(t.shape, generator=gen) * 0.1 for t in spec.head_unit.tensors}
    x = torch.randn(2, 7, 32, generator=gen, requires_grad=True)
    targets = heads.shift_labels(torch.randint(0, 50, (2, 7), generator=gen))
    loss, n = NEXT_TOKEN.loss(spec, head, x, targets, chunk_tokens=3, matmul_dtype=None)
    logits = heads.head_logits(spec, head, x)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), reduction="sum")
    assert n == int((targets != heads.IGNORE_INDEX).sum())
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert (NEXT_TOKEN.name, NEXT_TOKEN.logs, NEXT_TOKEN.extra_forward_passes) == ("next_token", ("loss",), 0)
