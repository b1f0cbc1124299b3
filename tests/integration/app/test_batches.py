"""Batches from users: integer ids of shape (batch, seq), or one ConfigError naming the tensor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lema import LemaConfig, LemaModel
from lema.app.runtime.batches import as_batch
from lema.errors import ConfigError
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model

BAD = settings.get_profile("bad-inputs")
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=2)


@BAD
@given(shapes, st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool,
                                torch.complex64]), st.sampled_from(["input_ids", "labels"]))
def test_token_ids_that_are_not_integers_are_refused_not_truncated(shape, dtype, name):
    """Property: 1.7 is never silently read as token 1."""
    with pytest.raises(ConfigError, match=rf"{name}: expected integer token ids"):
        as_batch(torch.ones(shape, dtype=dtype), name)


@BAD
@given(shapes, st.sampled_from([torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]))
def test_integer_ids_of_any_width_become_int64(shape, dtype):
    out = as_batch(torch.ones(shape, dtype=dtype), "input_ids")
    assert out.dtype == torch.long and out.dim() == 2


@BAD
@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4), min_size=2, max_size=3)
       .filter(lambda rows: len({len(r) for r in rows}) > 1) | st.just([[2**70]]) | st.just([["a"]]))
def test_ragged_or_overflowing_lists_are_a_config_error(rows):
    with pytest.raises(ConfigError, match="input_ids"):
        as_batch(rows, "input_ids")


def test_masks_may_be_boolean_or_zero_one_floats_but_not_other_floats():
    assert as_batch(torch.tensor([[True, False]]), "attention_mask").tolist() == [[1, 0]]
    assert as_batch(torch.tensor([[1.0, 0.0]]), "attention_mask").tolist() == [[1, 0]]
    with pytest.raises(ConfigError, match="only 0 and 1"):
        as_batch(torch.tensor([[0.5, 1.0]]), "attention_mask")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_monolithic(build_hf_model("llama"), tmp_path_factory.mktemp("m") / "m.safetensors")
    with LemaModel(LemaConfig(gbi_path=str(path), device="cpu", lora_rank=2)) as lema:
        lema.initialize_lora()
        yield lema


def test_train_step_refuses_float_ids_labels_outside_the_vocabulary_and_mismatched_shapes(model):
    trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.0))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ConfigError, match="input_ids: expected integer token ids"):
        trainer.train_step(ids.float() + 0.7)
    with pytest.raises(ConfigError, match=r"labels: 500 is not a token id in \[0, 128\)"):
        trainer.train_step(ids, labels=torch.tensor([[1, 500, -100]]))
    with pytest.raises(ConfigError, match="labels: shape"):
        trainer.train_step(ids, labels=torch.tensor([[1, 2]]))
    with pytest.raises(ConfigError, match="attention_mask: shape"):
        trainer.train_step(ids, attention_mask=torch.tensor([[1, 1]]))
    _, loss = trainer.train_step(ids, labels=torch.tensor([[1, -100, 3]]))
    assert loss == loss  # the valid batch still trains
