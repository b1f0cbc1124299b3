"""The user guide's four-step workflow runs unchanged (paths aside) on a tiny model."""

from __future__ import annotations

import os

from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model


def _the_guide(dataloader, model_dir):
    # --- SEED_USER_GUIDE.md §2, unchanged except for the model paths ----------------------
    import torch

    from lema import LemaConfig, LemaModel, LemaTrainer

    # 1. Setup Config
    config = LemaConfig(
        model_name_or_path=str(model_dir),
        gbi_path="llama2_7b.safetensors",
        lora_rank=16,
        gradient_checkpointing=True,
    )

    # 2. Initialize
    model = LemaModel(config)
    model.initialize_lora()  # Crucial for new models

    # 3. Training
    optimizer = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4)
    trainer = model.get_trainer(optimizer)

    for batch in dataloader:
        logits, loss = trainer.train_step(batch["input_ids"], labels=batch["labels"])
        print(f"Loss: {loss}")

    # 4. Save
    trainer.save_checkpoint("checkpoints/lema-llama-7b-v1")
    # ----------------------------------------------------------------------------------------
    return trainer, LemaTrainer


def test_the_guides_workflow_runs_as_written(tmp_path, capsys):
    import torch

    model_dir = tmp_path / "tiny-llama"
    build_hf_model("llama").save_pretrained(model_dir)
    save_monolithic(build_hf_model("llama"), tmp_path / "llama2_7b.safetensors")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    dataloader = [{"input_ids": ids, "labels": ids}] * 3
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        trainer, trainer_class = _the_guide(dataloader, model_dir)
    finally:
        os.chdir(cwd)
    assert isinstance(trainer, trainer_class)
    assert capsys.readouterr().out.count("Loss: ") == 3
    assert (tmp_path / "checkpoints/lema-llama-7b-v1/adapter_model.safetensors").is_file()
    assert (tmp_path / "checkpoints/lema-llama-7b-v1/adapter_config.json").is_file()
