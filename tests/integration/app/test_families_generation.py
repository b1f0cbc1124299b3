"""Every family's greedy generation is token-identical to transformers' ``generate`` for 20 tokens.

A batch of two 8-token prompts, the second left-padded, so the 28-token sequences run past
the sliding windows (4-5; their KV caches keep only ``window - 1`` keys) and past Phi-3's
LongRoPE original length (16, where transformers recomputes the sequence with the long
factors, and so does LEMA).
"""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.app.tools.generation import generate, kv_cache_bytes
from lema.domain.families import registry
from tests.family_models import FAMILIES, build, files

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NEW = 20


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(root, name):
    hf = build(name)
    _, path = files(name, root)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():  # the models have no end-of-sequence token: 20 tokens on both sides
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with LemaModel(LemaConfig(gbi_path=str(path), device="cpu")) as model:
        out = generate(model, ids, NEW, attention_mask=mask)
        assert out.shape == (2, 8 + NEW)
        assert torch.equal(out, expected), (name, out, expected)
        layout = registry.params_of(model.spec).layout
        if set(layout.layer_types) == {"sliding_attention"}:  # the cache stops growing at the window
            assert kv_cache_bytes(model, 2, 8 + NEW) == kv_cache_bytes(model, 2, layout.sliding_window)
