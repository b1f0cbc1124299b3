"""run_training from Python: the same run as a ``lema train`` command line gives the same adapter and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lema import TrainOptions, run_training
from lema.cli import main
from tests.demo_models import tiny_llama_folder, write_data

pytest.importorskip("transformers")

TIMING = {"tokens_per_s", "seconds", "eta_s"}  # wall-clock fields: the only ones two identical runs may differ in


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_run_training_from_python_gives_the_adapter_and_metrics_of_lema_train(tmp_path):
    model = tiny_llama_folder(tmp_path / "model")
    data = write_data(tmp_path / "data")["pc"]
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    result = CliRunner().invoke(main, ["train", "--model", str(model), "--data", str(data), "--out", str(cli_out),
                                       "--batch", "2", "--seq", "48", "--rank", "4", "--lr", "1e-2", "--steps", "3",
                                       "--eval-split", "0.25", "--device", "cpu", "--seed", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output

    lines: list[str] = []
    status = run_training(TrainOptions(model_path=str(model), data=str(data), out=str(api_out), batch=2, seq=48,
                                       rank=4, lr=1e-2, steps=3, eval_split=0.25, device="cpu", seed=3),
                          echo=lines.append)

    assert status == 0
    assert any(line.startswith("done: 3 steps") for line in lines)
    cli_adapter = load_file(str(cli_out / "final" / "adapter_model.safetensors"))
    api_adapter = load_file(str(api_out / "final" / "adapter_model.safetensors"))
    assert cli_adapter.keys() == api_adapter.keys()
    assert all(torch.equal(cli_adapter[k], api_adapter[k]) for k in cli_adapter)
    assert _metrics(api_out) == _metrics(cli_out)
    assert len(_metrics(api_out)) == 4  # three steps and the final evaluation
