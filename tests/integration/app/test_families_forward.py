"""Every family's logits equal transformers' (fp32, tolerance rule), padded or not, STREAMING and RESIDENT.

One model per family (tests/family_models.py: tiny, every feature of the family on),
written by ``save_pretrained`` and converted by ``lema convert``, then read by LemaModel
both ways. Sequences (12) are longer than the sliding windows (4-5) and than Phi-3's
LongRoPE original length is not: that switch is covered by the generation test.
"""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from tests.family_models import FAMILIES, batch, build, files
from tests.tolerance import assert_close, forward_floor, logits_noise

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_transformers_streaming_and_resident(root, name):
    hf = build(name)
    _, path = files(name, root)
    cases = [batch(1), batch(2, padded=True)]
    with torch.no_grad():
        expected = [hf(input_ids=ids, attention_mask=mask).logits for ids, mask in cases]
    reals = [torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool() for ids, mask in cases]
    noises = [logits_noise(hf, ids, mask, select=real) for (ids, mask), real in zip(cases, reals)]
    floor = forward_floor(hf.config, cases[0][0].shape[1])
    for strategy in (MemoryStrategy.STREAMING, MemoryStrategy.RESIDENT):
        with LemaModel(LemaConfig(gbi_path=str(path), device="cpu", strategy=strategy)) as model:
            assert model.spec.family == name
            for (ids, mask), want, real, noise in zip(cases, expected, reals, noises):
                got = model.logits(ids, attention_mask=mask)
                assert_close(got[real], want[real], noise=noise, floor=floor, what=(name, strategy, mask is not None))
