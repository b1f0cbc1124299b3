"""`lema plan` predicts the step time (issue 27): --calibrate measures and caches this machine's
rates, a later plan reuses them, --json carries the numbers, AUTO explains its choices."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lema.cli import main

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
        "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "max_position_embeddings": 512, "torch_dtype": "bfloat16"}
ARGS = ["--device", "cpu", "--batch", "2", "--seq", "64", "--strategy", "auto"]


@pytest.fixture()
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def _plan(*args: str):
    return CliRunner().invoke(main, ["plan", *args], catch_exceptions=False)


def test_without_calibration_the_plan_says_it_uses_the_defaults(config):
    result = _plan("--model", str(config), *ARGS)
    assert result.exit_code == 0, result.output
    assert "time: " in result.output and "s per step" in result.output and "-bound (" in result.output
    assert "rates: defaults for cpu (not calibrated: run `lema plan --calibrate`)" in result.output
    assert "chose: keeps activations of layers 1-4: -" in result.output


def test_calibrate_measures_caches_and_a_later_plan_reuses_it(config, tmp_path):
    result = _plan("--model", str(config), *ARGS, "--calibrate")
    assert result.exit_code == 0, result.output
    assert "rates: calibrated on cpu-" in result.output
    files = list((tmp_path / "cache" / "calibration").glob("*.json"))
    assert len(files) == 1
    entry = next(iter(json.loads(files[0].read_text()).values()))
    assert entry["calibrated"] and all(entry[k] > 0 for k in ("link_bytes_per_s", "matmul_flops_per_s",
                                                              "attention_flops_per_s", "memory_bytes_per_s"))
    # the fixed costs are measured too (a toy of the model's family, the optimizer's tensors, the step's parts)
    assert {k: entry[k] for k in ("layer_forward_overhead_s", "layer_backward_overhead_s", "head_overhead_s",
                                  "tensor_overhead_s", "step_overhead_s") if not entry[k] > 0} == {}
    assert entry["unit_overhead_s"] >= 0  # the engine's per-step bookkeeping: 5 toy layers against 1
    assert "fixed costs: layer forward " in result.output
    data = json.loads(_plan("--model", str(config), *ARGS, "--json").stdout)
    time = data["time"]
    assert time["rates"]["calibrated"] and time["rates"] == entry
    assert time["step_seconds"] > 0 and time["bound"] in ("compute", "link", "disk") and 0 < time["bound_share"] <= 1
    assert time["tokens_per_second"] == pytest.approx(2 * 64 / time["step_seconds"])
    assert 0 < time["fixed_seconds"] < time["step_seconds"]
    assert data["shape"]["kept_layers"] == 4 and data["choices"]
    # another shape is another calibration: the defaults again
    other = _plan("--model", str(config), *ARGS[:-4], "--seq", "32", "--strategy", "auto")
    assert "rates: defaults for cpu" in other.output


def test_a_damaged_cache_is_a_miss(config, tmp_path):
    folder = tmp_path / "cache" / "calibration"
    assert _plan("--model", str(config), *ARGS, "--calibrate").exit_code == 0
    for path in folder.glob("*.json"):
        path.write_text("{not json")
    result = _plan("--model", str(config), *ARGS)
    assert result.exit_code == 0 and "rates: defaults for cpu" in result.output


def test_calibrating_a_gpu_on_a_machine_without_one_is_refused(config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(main, ["plan", "--model", str(config), "--device", "cuda", "--calibrate"])
    assert result.exit_code == 2
    assert "Error: --calibrate measures a local cuda device, but there is none here" in result.output
