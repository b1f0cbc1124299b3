"""What the frozen base model computes while training: the GPT-2 embedding sum in the
compute dtype, and the base model's own dropouts (not applied, and said so)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.errors import BaseDropoutWarning
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model
from tests.tolerance import assert_close, forward_floor, logits_noise


def test_a_bf16_gpt2_file_run_as_float32_matches_transformers_in_float32(tmp_path):
    hf = build_hf_model("gpt2", seed=5)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # what loading the bf16 file as float32 gives
    path = save_monolithic(hf, tmp_path / "gpt2-bf16.safetensors", dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    with LemaModel(LemaConfig(gbi_path=str(path), device="cpu", dtype="float32", lora_rank=2)) as model:
        ours = model.logits(ids)
        assert_close(ours, expected, noise=logits_noise(hf, ids), floor=forward_floor(model.spec, ids.shape[1]))


def _trainer_warnings(path, **config) -> list[warnings.WarningMessage]:
    with LemaModel(LemaConfig(gbi_path=str(path), device="cpu", lora_rank=2, **config)) as model:
        model.initialize_lora()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
    return [w for w in caught if issubclass(w.category, BaseDropoutWarning)]


def test_gpt2_base_dropouts_are_named_when_training_starts(tmp_path):
    hf = build_hf_model("gpt2", seed=5)
    hf.config.update({"embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1})
    caught = _trainer_warnings(save_monolithic(hf, tmp_path / "with.safetensors"))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1" in message and "does not apply" in message
    # The tiny test config sets them to 0: nothing to say.
    assert _trainer_warnings(save_monolithic(build_hf_model("gpt2", seed=5), tmp_path / "without.safetensors")) == []


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_llama_attention_dropout_is_named_only_when_set(tmp_path, p):
    hf = build_hf_model("llama", seed=5)
    hf.config.attention_dropout = p
    caught = _trainer_warnings(save_monolithic(hf, tmp_path / "m.safetensors"))
    assert len(caught) == (1 if p else 0)
