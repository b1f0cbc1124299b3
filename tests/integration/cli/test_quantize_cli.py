"""Quantized bases from the command line: plan --quantize, convert --quantize, train and generate
on a folder quantized by transformers + bitsandbytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from lema import LemaConfig, LemaModel
from lema.cli import main
from tests.demo_models import tiny_llama_folder, write_data
from tests.quant_models import bnb_config, hf_quantized
from tests.tolerance import assert_close, forward_floor, logits_noise

pytest.importorskip("bitsandbytes")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with a tokenizer, and the same folder quantized to NF4 by transformers."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("quant_cli")
    dense = tiny_llama_folder(root / "dense", hidden=64)
    nf4 = root / "nf4"
    AutoModelForCausalLM.from_pretrained(dense, quantization_config=bnb_config("nf4_dq"),
                                         device_map="cpu").save_pretrained(nf4)
    for f in dense.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, nf4 / f.name)
    return {"dense": dense, "nf4": nf4, "data": write_data(root / "data")["txt"]}


def test_plan_llama_3_1_70b_in_nf4_on_24g_itemises_and_fits():
    result = run("plan", "--model", "llama-3.1-70b", "--vram", "24G", "--quantize", "nf4")
    assert result.exit_code == 0, result.output
    for words in ("NF4 + double quant, computing in BF16", "weight_slots", "dequant_scratch", "FITS"):
        assert words in result.output
    packed = json.loads(run("plan", "--model", "llama-3.1-70b", "--vram", "24G", "--quantize", "nf4", "--json").output)
    dense = json.loads(run("plan", "--model", "llama-3.1-70b", "--vram", "24G", "--json").output)
    assert packed["fits"] and packed["model"]["quantization"] == "NF4 + double quant"
    assert packed["model"]["parameters"] == dense["model"]["parameters"]
    # the head (2 GiB, not quantized) crosses the link once a step, the layers about twice
    assert packed["transfer_bytes_per_step"] < 0.3 * dense["transfer_bytes_per_step"]
    names = [i["name"] for i in packed["device"]["items"]]
    assert "dequant_scratch" in names and "dequant_scratch" not in [i["name"] for i in dense["device"]["items"]]


def test_plan_reads_a_quantized_folder_and_refuses_to_requantize_it(tiny):
    result = run("plan", "--model", str(tiny["nf4"]), "--vram", "1G", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "NF4 + double quant, computing in F32" in result.output
    result = run("plan", "--model", str(tiny["nf4"]), "--vram", "1G", "--quantize", "int8")
    assert result.exit_code == 2 and "already quantized" in result.output
    result = run("plan", "--model", "gpt2", "--quantize", "nf4")
    assert result.exit_code == 2 and "Conv1D" in result.output


def test_convert_quantize_writes_what_transformers_writes_and_transformers_loads_it(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nf4.safetensors"
    result = run("convert", str(tiny["dense"]), str(out), "--quantize", "nf4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    ours, theirs = load_file(out), load_file(tiny["nf4"] / "model.safetensors")
    assert set(ours) == set(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    with safe_open(out, "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert config["quantization_config"] == json.loads((tiny["nf4"] / "config.json").read_text())["quantization_config"]
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(out, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    loaded = hf_quantized(folder)
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_quantized(tiny["nf4"])(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    # LEMA reads it, and the transformers-written folder converted without --quantize, alike.
    copied = tmp_path / "copied.safetensors"
    assert run("convert", str(tiny["nf4"]), str(copied), "--dtype", "bfloat16").exit_code == 0
    with LemaModel(LemaConfig(gbi_path=str(out), device="cpu")) as model:
        assert model.spec.quantization is not None
        reference = hf_quantized(tiny["nf4"])
        assert_close(model.logits(ids), expected, noise=logits_noise(reference, ids),
                     floor=forward_floor(reference.config, ids.shape[1]))
    with LemaModel(LemaConfig(gbi_path=str(copied), device="cpu")) as model:
        assert model.spec.quantization is not None and model.spec.dtype == "BF16"
        assert model.logits(ids).shape == expected.shape
    with safe_open(copied, "pt") as f:  # packed tensors keep their dtypes; norms follow --dtype
        assert f.get_slice("model.layers.0.mlp.up_proj.weight.absmax").get_dtype() == "U8"
        assert f.get_slice("model.layers.0.mlp.up_proj.weight.nested_absmax").get_dtype() == "F32"
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"


def test_convert_refuses_to_quantize_twice_and_writes_nothing(tiny, tmp_path):
    result = run("convert", str(tiny["nf4"]), str(tmp_path / "x.safetensors"), "--quantize", "nf4")
    assert result.exit_code == 2 and "already quantized" in result.output
    assert not (tmp_path / "x.safetensors").exists()
    result = run("convert", str(tiny["dense"]), str(tmp_path / "x.safetensors"), "--quantize", "int8",
                 "--no-double-quant")
    assert result.exit_code == 2 and "--no-double-quant needs" in result.output


def test_train_and_generate_open_a_quantized_folder(tiny, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    result = run("train", "--model", str(tiny["nf4"]), "--data", str(tiny["data"]), "--out", str(out), "--batch",
                 "2", "--seq", "32", "--rank", "4", "--lr", "1e-2", "--device", "cpu", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file() or any(out.rglob("adapter_model.safetensors"))
    result = run("generate", "--model", str(tiny["nf4"]), "--prompt", "the cat", "--max-new-tokens", "5",
                 "--device", "cpu", "--no-echo")
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(tiny["nf4"])
    ids = tok("the cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = hf_quantized(tiny["nf4"]).generate(ids, max_new_tokens=5, do_sample=False,
                                                      pad_token_id=tok.pad_token_id)
    assert result.output == tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
