"""Every family through the command line as a user runs it: convert, plan, train, generate with
the checkpoint, and merge into a folder transformers loads with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lema import LemaConfig, LemaModel
from lema.cli import main
from tests.demo_models import byte_tokenizer, write_data
from tests.family_models import FAMILIES, build
from tests.tolerance import assert_close, forward_floor, logits_noise

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))["txt"]


@pytest.mark.parametrize("name", FAMILIES)
def test_convert_plan_train_generate_merge(tmp_path, data, name):
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    build(name, vocab=len(tok)).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    model = tmp_path / "model.safetensors"
    run("convert", str(tmp_path / "hf"), str(model), "--device", "cpu")
    plan = json.loads(run("plan", "--model", str(model), "--seq", "16", "--json"))
    assert plan["model"]["family"] == name
    run("train", "--model", str(model), "--tokenizer", str(tmp_path / "hf"), "--data", str(data), "--out",
        str(tmp_path / "run"), "--steps", "2", "--seq", "16", "--batch", "1", "--device", "cpu", "--lr", "0.05")
    checkpoint = next(p for p in sorted((tmp_path / "run").rglob("adapter_config.json"))).parent
    text = run("generate", "--model", str(model), "--adapter", str(checkpoint), "--tokenizer", str(tmp_path / "hf"),
               "--prompt", "the", "--max-new-tokens", "4", "--device", "cpu")
    assert text.startswith("the")
    run("merge", "--base", str(model), "--adapter", str(checkpoint), "--out", str(tmp_path / "merged"), "--hf-folder")
    ids = torch.randint(3, len(tok), (1, 10), generator=torch.Generator().manual_seed(0))
    tuned = LemaModel(LemaConfig(gbi_path=str(model), device="cpu"))
    tuned.load_adapter(checkpoint)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                  attn_implementation="eager" if name == "gemma2" else "sdpa")
    with torch.no_grad():
        assert_close(tuned.logits(ids), merged(input_ids=ids).logits, noise=logits_noise(merged, ids),
                     floor=forward_floor(merged.config, ids.shape[1], extra=1))  # + the merge's rounding
