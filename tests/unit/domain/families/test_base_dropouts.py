"""Which of the base model's own dropouts a config asks for (LEMA does not apply them)."""

from __future__ import annotations

import pytest

from lema.domain.families.registry import base_dropouts
from tests.tiny_models import tiny_config


def test_gpt2_uses_transformers_defaults_for_missing_keys():
    assert base_dropouts({"model_type": "gpt2"}) == {"embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1}
    assert base_dropouts({"model_type": "gpt2", "embd_pdrop": 0.0, "attn_pdrop": 0.2, "resid_pdrop": 0}) == \
        {"attn_pdrop": 0.2}
    assert base_dropouts(tiny_config("gpt2")) == {}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_llama_family_attention_dropout(kind):
    config = tiny_config(kind)
    assert base_dropouts(config) == {}
    assert base_dropouts({**config, "attention_dropout": 0.25}) == {"attention_dropout": 0.25}
