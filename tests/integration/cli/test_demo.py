"""``lema demo`` end to end (reduced size): the loss falls and the checkpoint is usable."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from lema.cli import main

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "lema-demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--size", "tiny", "--steps", "30"],
                                catch_exceptions=False)
    return out, result


def test_demo_runs_and_the_held_out_loss_falls(demo_run):
    out, result = demo_run
    assert result.exit_code == 0, result.output
    match = re.search(r"held-out loss: before ([\d.]+) -> after ([\d.]+)", result.output)
    assert match, result.output
    before, after = float(match.group(1)), float(match.group(2))
    assert after < before - 0.2
    assert "plan: streaming on cpu" in result.output
    assert "greedy before:" in result.output and "greedy after:" in result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"]


def test_demo_checkpoint_loads_in_lema_and_in_peft_with_the_same_logits(demo_run):
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lema import LemaModel

    out, result = demo_run
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(out / "final")  # the checkpoint carries the tokenizer
    ids = torch.tensor([tok("The train left the station")["input_ids"]])
    lema_model = LemaModel.from_pretrained(out / "final")
    ours = lema_model.forward(ids)
    base = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32, attn_implementation="sdpa").eval()
    reference = PeftModel.from_pretrained(base, out / "final").eval()
    with torch.no_grad():
        theirs = reference(ids).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), reference.disable_adapter():
        untouched = reference(ids).logits.float()
    assert not torch.allclose(untouched, theirs, atol=1e-3)  # the adapter changed the model
