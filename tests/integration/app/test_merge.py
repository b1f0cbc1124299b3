"""Merging a LoRA adapter: the merged model gives peft's logits, and bad input writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from lema.adapters.checkpoints.store import read_adapter, write_checkpoint
from lema.app.tools.convert import prepare_monolithic_safetensors
from lema.app.tools.merge import merge_adapter
from lema.cli import main
from lema.errors import CheckpointError
from tests.tolerance import assert_close, forward_floor, logits_noise

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_model(family: str, seed: int = 0, hidden: int = 64):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       max_position_embeddings=64)
    else:
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def make_adapter(family: str, base_dir: Path, adapter_dir: Path, **lora_kwargs):
    """Save a base model and a peft LoRA adapter with random, non-zero lora_B."""
    tiny_model(family).save_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if family == "llama":
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **lora_kwargs)
    else:
        cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, **lora_kwargs)
    peft_model = peft.get_peft_model(model, cfg)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    peft_model.save_pretrained(adapter_dir)
    return peft_model.eval()


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family,via,rslora", [("llama", "monolithic", False), ("llama", "folder", True),
                                               ("gpt2", "folder", False), ("gpt2", "monolithic", False)])
def test_merged_model_matches_peft_logits(tmp_path, family, via, rslora):
    reference = make_adapter(family, tmp_path / "base", tmp_path / "adapter", use_rslora=rslora)
    with torch.no_grad():
        want = reference(IDS).logits
        with reference.disable_adapter():
            plain = reference(IDS).logits
    assert (want - plain).abs().max() > 1e-2, "the adapter must change the logits for the test to mean anything"
    # A LEMA checkpoint holding peft's adapter works the same as peft's own directory.
    config, tensors = read_adapter(tmp_path / "adapter")
    write_checkpoint(tmp_path / "ckpt", adapter_tensors=tensors, adapter_config=config)
    base = tmp_path / "base"
    if via == "monolithic":
        base = prepare_monolithic_safetensors(tmp_path / "base", tmp_path / "base.safetensors")
    out = merge_adapter(base, tmp_path / "ckpt", tmp_path / "merged", hf_folder=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(IDS).logits
    # merging rounds W + s*BA once more per weight: one more stage on top of the forward's floor
    assert_close(got, want, noise=logits_noise(reference, IDS), floor=forward_floor(merged.config, 16, extra=1))
    # The monolithic output holds the same tensors plus the tied head, and describes itself.
    mono = merge_adapter(base, tmp_path / "ckpt", tmp_path / "merged.safetensors")
    folder_tensors, mono_tensors = load_file(out / "model.safetensors"), load_file(mono)
    assert all(torch.equal(mono_tensors[k], v) for k, v in folder_tensors.items())
    assert "lm_head.weight" in mono_tensors
    with safe_open(str(mono), "pt") as f:
        assert json.loads(f.metadata()["config"]) == json.loads((tmp_path / "base" / "config.json").read_text())


def test_merge_to_bfloat16_and_tokenizer_files(tmp_path):
    make_adapter("llama", tmp_path / "base", tmp_path / "adapter")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "m", dtype="bfloat16", hf_folder=True,
                        tokenizer_dir=tmp_path / "tok")
    assert (out / "tokenizer_config.json").is_file()
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("hf_folder", [False, True])
def test_non_finite_merge_is_refused_and_writes_nothing(tmp_path, hf_folder):
    make_adapter("llama", tmp_path / "base", tmp_path / "adapter")
    config, tensors = read_adapter(tmp_path / "adapter")
    key = next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    write_checkpoint(tmp_path / "bad", adapter_tensors=tensors, adapter_config=config)
    out = tmp_path / ("m" if hf_folder else "m.safetensors")
    # A NaN in the adapter itself is named when the adapter is read (issue 25), before any merge.
    with pytest.raises(CheckpointError, match=f"{key} holds NaN or infinite values"):
        merge_adapter(tmp_path / "base", tmp_path / "bad", out, hf_folder=hf_folder)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "bad", "base"]


def test_non_finite_merge_keeps_an_existing_output(tmp_path):
    make_adapter("llama", tmp_path / "base", tmp_path / "adapter")
    out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "m.safetensors")
    before = out.read_bytes()
    config, tensors = read_adapter(tmp_path / "adapter")
    tensors = {k: v * 1e30 for k, v in tensors.items()}  # B @ A overflows float32
    write_checkpoint(tmp_path / "huge", adapter_tensors=tensors, adapter_config=config)
    with pytest.raises(CheckpointError, match="non-finite"):
        merge_adapter(tmp_path / "base", tmp_path / "huge", out, overwrite=True)
    assert out.read_bytes() == before


def test_adapter_for_another_model_is_refused(tmp_path):
    make_adapter("llama", tmp_path / "llama", tmp_path / "llama_adapter")
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="modules the base model lacks"):
        merge_adapter(tmp_path / "gpt2", tmp_path / "llama_adapter", tmp_path / "m.safetensors")
    tiny_model("llama", hidden=32).save_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointError, match="another model"):
        merge_adapter(tmp_path / "small", tmp_path / "llama_adapter", tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        merge_adapter(tmp_path / "llama", tmp_path / "nowhere", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_merge(tmp_path):
    make_adapter("gpt2", tmp_path / "base", tmp_path / "adapter")
    result = CliRunner().invoke(main, ["merge", "--base", str(tmp_path / "base"), "--adapter",
                                       str(tmp_path / "adapter"), "--out", str(tmp_path / "m"), "--hf-folder"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    result = CliRunner().invoke(main, ["merge", "--base", str(tmp_path / "base"), "--adapter",
                                       str(tmp_path / "missing"), "--out", str(tmp_path / "m2")])
    assert result.exit_code == 2 and result.output.startswith("Error:") and "Traceback" not in result.output
