"""``lema demo`` end to end (reduced size): a model at least 3x the device's measured peak
chat-tunes, its held-out loss falls, and the checkpoint is usable."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from lema.adapters.weights.safetensors_header import read_header
from lema.cli import main
from tests.tolerance import assert_close, forward_floor, logits_noise

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # a whole demo run (reduced): tens of seconds on 2 cores


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "lema-demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--size", "tiny", "--steps", "20"],
                                catch_exceptions=False)
    return out, result


def test_demo_runs_and_the_held_out_loss_falls(demo_run):
    out, result = demo_run
    assert result.exit_code == 0, result.output
    match = re.search(r"held-out loss: before ([\d.]+) -> after ([\d.]+)", result.output)
    assert match, result.output
    before, after = float(match.group(1)), float(match.group(2))
    assert after < before - 1.0
    assert "plan: streaming on cpu" in result.output
    assert "reply before:" in result.output and "reply after:" in result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(train) == 20 and train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20] and evals[-1] < evals[0]


def test_demo_model_is_at_least_3x_the_device_it_ran_on(demo_run):
    """The weights are at least 3x the device budget and 3x the measured device peak."""
    out, result = demo_run
    plan = re.search(r"weights ([\d.]+) MiB on disk.*device budget ([\d.]+) MiB", result.output)
    assert plan, result.output
    weights, budget = float(plan.group(1)), float(plan.group(2))
    assert weights >= 3 * budget
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = max(r["device_peak_bytes"] for r in rows if "device_peak_bytes" in r)
    model_file = out / "base" / "model.safetensors"
    weight_bytes = model_file.stat().st_size - read_header(model_file).data_start  # the tensors' bytes
    assert weight_bytes >= 3 * peak, (weight_bytes, peak)
    assert peak <= budget * 2**20
    assert re.search(r"are [\d.]+x what the device held", result.output)


def test_demo_checkpoint_loads_in_lema_and_in_peft_with_the_same_logits(demo_run):
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lema import LemaModel

    out, result = demo_run
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(out / "final")  # the checkpoint carries the tokenizer
    ids = torch.tensor([tok("When do you open on Sunday?")["input_ids"]])
    lema_model = LemaModel.from_pretrained(out / "final")
    ours = lema_model.logits(ids)
    base = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32, attn_implementation="sdpa").eval()
    reference = PeftModel.from_pretrained(base, out / "final").eval()
    with torch.no_grad():
        theirs = reference(ids).logits.float()
    assert_close(ours, theirs, noise=logits_noise(reference, ids), floor=forward_floor(base.config, ids.shape[1]))
    with torch.no_grad(), reference.disable_adapter():
        untouched = reference(ids).logits.float()
    assert not torch.allclose(untouched, theirs, atol=1e-3)  # the adapter changed the model
