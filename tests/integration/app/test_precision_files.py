"""A float16 model file trains in bfloat16 where the device has it (issue 23; the choice's
logic: tests/unit/domain/model/test_precision.py)."""

from __future__ import annotations

import pytest


def test_a_float16_model_file_trains_in_bfloat16_on_the_cpu_and_warns(tmp_path):
    import torch

    from lema import LemaConfig, LemaModel
    from lema.errors import LemaWarning
    from tests.tiny_models import build_hf_model

    build_hf_model("llama").to(torch.float16).save_pretrained(tmp_path / "fp16")
    config = dict(model_name_or_path=str(tmp_path / "fp16"), device="cpu", lora_rank=4, batch_size=1, max_seq_len=8)
    with pytest.warns(LemaWarning, match="computes in bfloat16"):
        model = LemaModel(LemaConfig(**config))
    with model:
        assert model.spec.dtype == "F16" and model.compute_dtype == torch.bfloat16
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1))
        _, loss = trainer.train_step(torch.randint(0, 128, (1, 8)))
        assert loss == loss and abs(loss) < float("inf")
    with pytest.warns(LemaWarning, match="loss scaling"), LemaModel(LemaConfig(**config, dtype="float16")) as kept:
        assert kept.compute_dtype == torch.float16
