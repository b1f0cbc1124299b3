"""LEMA checkpoints are peft adapters, both ways, and resume is bit-identical across processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.errors import CheckpointError
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model
from tests.tolerance import assert_close, forward_floor, logits_noise

REPO = Path(__file__).resolve().parents[3]


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def base(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    hf = build_hf_model(kind, seed=2)
    hf.save_pretrained(folder / "hf")
    save_monolithic(hf, folder / "model.safetensors")
    return kind, folder


def _trained(folder: Path, steps: int = 3) -> tuple[LemaModel, object]:
    model = LemaModel(LemaConfig(model_name_or_path=str(folder / "hf"), gbi_path=str(folder / "model.safetensors"),
                                 device="cpu", lora_rank=4, seed=1))
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=5e-2))
    for i in range(steps):
        trainer.train_step(_ids(i))
    return model, trainer


def _peft_model(folder: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32, attn_implementation="sdpa")
    return PeftModel.from_pretrained(hf, str(adapter)).eval()


def test_peft_loads_a_lema_checkpoint_and_gives_the_same_logits(base, tmp_path):
    kind, folder = base
    model, trainer = _trained(folder)
    trainer.save_checkpoint(tmp_path / "ckpt")
    peft_model = _peft_model(folder, tmp_path / "ckpt")
    ids = _ids(99)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    ours = model.logits(ids)
    assert_close(ours, expected, noise=logits_noise(peft_model, ids), floor=forward_floor(model.spec, ids.shape[1]))
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits
    assert torch.max(torch.abs(plain - expected)) > 1e-3  # the adapter really changed the model


def test_lema_loads_a_peft_trained_adapter_and_gives_the_same_logits(base, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    kind, folder = base
    hf = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32, attn_implementation="sdpa")
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_fc"]
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for i in range(3):  # train with peft so lora_B is non-zero
        loss = peft_model(input_ids=_ids(i), labels=_ids(i)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    peft_model.eval()
    ids = _ids(42)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    model = LemaModel(LemaConfig(gbi_path=str(folder / "model.safetensors"), device="cpu"))
    model.load_adapter(tmp_path / "peft-adapter")
    assert_close(model.logits(ids), expected, noise=logits_noise(peft_model, ids),
                 floor=forward_floor(model.spec, ids.shape[1]))


def test_an_adapter_for_another_base_is_refused_and_nothing_changes(base, tmp_path):
    kind, folder = base
    other = "gpt2" if kind == "llama" else "llama"
    other_folder = tmp_path / other
    other_folder.mkdir()
    hf = build_hf_model(other)
    hf.save_pretrained(other_folder / "hf")
    save_monolithic(hf, other_folder / "model.safetensors")
    _, trainer = _trained(other_folder, steps=1)
    trainer.save_checkpoint(tmp_path / "other-ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "other-ckpt").iterdir()}
    model = LemaModel(LemaConfig(gbi_path=str(folder / "model.safetensors"), device="cpu"))
    with pytest.raises(CheckpointError):
        model.load_adapter(tmp_path / "other-ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "other-ckpt").iterdir()} == before


def test_a_truncated_adapter_is_a_checkpoint_error(base, tmp_path):
    _, folder = base
    _, trainer = _trained(folder, steps=1)
    trainer.save_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    model = LemaModel(LemaConfig(gbi_path=str(folder / "model.safetensors"), device="cpu"))
    with pytest.raises(CheckpointError):
        model.load_adapter(tmp_path / "ckpt")
    with pytest.raises(CheckpointError):
        LemaModel.from_pretrained(tmp_path / "ckpt")


_RESUME = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    from lema import LemaModel
    from tests.integration.app.test_checkpoint_interop import _ids
    model = LemaModel.from_pretrained({ckpt!r})
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=5e-2))
    consumed = trainer.global_step * trainer.accumulation + trainer.micro_step
    for i in range(consumed, {total}):
        trainer.train_step(_ids(i))
    trainer.save_checkpoint({out!r})
""")


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    folder = tmp_path
    hf = build_hf_model("llama", seed=3)
    hf.save_pretrained(folder / "hf")
    save_monolithic(hf, folder / "model.safetensors")
    config = LemaConfig(gbi_path=str(folder / "model.safetensors"), device="cpu", lora_rank=4, seed=1,
                        lora_dropout=0.1, gradient_accumulation_steps=2)

    def run(steps: int) -> tuple[LemaModel, object]:
        model = LemaModel(config)
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=5e-2))
        for i in range(steps):
            trainer.train_step(_ids(i))
        return model, trainer

    torch.manual_seed(0)
    straight, _ = run(6)
    torch.manual_seed(0)
    _, partial = run(3)  # mid-accumulation: 1 optimizer step + 1 micro-step
    partial.save_checkpoint(tmp_path / "ckpt")
    script = _RESUME.format(repo=str(REPO), ckpt=str(tmp_path / "ckpt"), total=6, out=str(tmp_path / "resumed"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file

    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    ours = straight.lora.state_dict_peft(straight.spec)
    assert resumed.keys() == ours.keys()
    for key, tensor in ours.items():
        assert torch.equal(resumed[key], tensor), key
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["micro_step"] == 0


def test_from_pretrained_accepts_a_device_name_and_config_overrides(tmp_path):
    hf = build_hf_model("llama", seed=4)
    save_monolithic(hf, tmp_path / "model.safetensors")
    model = LemaModel(LemaConfig(gbi_path=str(tmp_path / "model.safetensors"), device="auto", lora_rank=4))
    model.initialize_lora()
    model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3)).save_checkpoint(tmp_path / "c")
    moved = tmp_path / "moved.safetensors"
    (tmp_path / "model.safetensors").rename(moved)
    again = LemaModel.from_pretrained(tmp_path / "c", device="cpu", gbi_path=str(moved))
    assert again.config.device == "cpu" and again.device.torch_device.type == "cpu"
    assert again.config.gbi_path == str(moved)
