"""lema.train(...): lema train's run from Python, with callbacks that see logs, evaluations and saves and may stop it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lema
from lema.errors import ConfigError
from tests.demo_models import tiny_llama_folder, write_data

pytest.importorskip("transformers")

RUN = dict(batch=2, seq=48, rank=4, lr=1e-2, device="cpu", seed=3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_api")
    return tiny_llama_folder(root / "model"), write_data(root / "data")["pc"]


class Recorder(lema.Callback):
    def __init__(self, stop_after: int | None = None) -> None:
        self.logs: list[dict] = []
        self.evals: list[dict] = []
        self.saves: list[Path] = []
        self.steps_seen: list[tuple[int, int]] = []
        self.stop_after = stop_after

    def on_log(self, run, metrics):
        self.logs.append(dict(metrics))
        self.steps_seen.append((run.step, run.total_steps))
        if self.stop_after is not None and run.step >= self.stop_after:
            run.stop()

    def on_evaluate(self, run, metrics):
        self.evals.append(dict(metrics))

    def on_save(self, run, path):
        assert (path / "adapter_model.safetensors").is_file()  # written when the hook runs
        self.saves.append(path)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_callback_stops_the_run_after_n_steps(inputs, tmp_path):
    model, data = inputs
    recorder = Recorder(stop_after=2)
    result = lema.train(model, data, tmp_path / "run", steps=6, callbacks=[recorder], echo=None, **RUN)
    assert result.stopped and result.status == 0 and result.steps == 2
    assert [row["step"] for row in _metrics(tmp_path / "run")] == [1, 2]
    assert result.checkpoint == tmp_path / "run" / "final"
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_on_log_gets_each_steps_metrics_and_the_adapter_is_lema_trains(inputs, tmp_path):
    model, data = inputs
    recorder = Recorder()
    lines: list[str] = []
    result = lema.train(model, data, tmp_path / "api", steps=3, eval_split=0.25, eval_steps=2,
                        callbacks=[recorder], echo=lines.append, **RUN)
    assert result.status == 0 and not result.stopped and result.steps == 3
    rows = _metrics(tmp_path / "api")
    assert recorder.logs == [row for row in rows if "loss" in row]  # the metrics.jsonl records, as written
    assert [log["step"] for log in recorder.logs] == [1, 2, 3]
    assert recorder.steps_seen == [(1, 3), (2, 3), (3, 3)]
    assert result.last_loss == recorder.logs[-1]["loss"]
    assert recorder.evals == [row for row in rows if "eval_loss" in row]
    assert [e["step"] for e in recorder.evals] == [2, 3]
    assert any(line.startswith("done: 3 steps") for line in lines)

    status = lema.run_training(lema.TrainOptions(model_path=str(model), data=str(data), out=str(tmp_path / "ref"),
                                                 steps=3, eval_split=0.25, eval_steps=2, **RUN), echo=lambda _: None)
    assert status == 0
    ours = load_file(str(tmp_path / "api" / "final" / "adapter_model.safetensors"))
    ref = load_file(str(tmp_path / "ref" / "final" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)


def test_on_save_gets_each_checkpoint_path(inputs, tmp_path):
    model, data = inputs
    recorder = Recorder()
    out = tmp_path / "run"
    result = lema.train(model, data, out, steps=4, save_steps=2, callbacks=[recorder], echo=None, **RUN)
    assert recorder.saves == [out / "checkpoint-2", out / "final"]
    assert result.checkpoint == out / "final"


def test_options_take_the_command_lines_names_and_unknown_ones_get_a_suggestion(inputs, tmp_path):
    model, data = inputs
    with pytest.raises(ConfigError, match="unknown option 'grad_acum'; did you mean 'grad_accum'"):
        lema.train(model, data, tmp_path / "a", steps=1, grad_acum=2, **RUN)
    with pytest.raises(ConfigError, match="same option"):
        lema.train(model, data, tmp_path / "b", steps=1, format="auto", data_format="auto", **RUN)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything was written


def test_an_error_in_a_callback_stops_the_run_and_it_resumes_from_the_last_checkpoint(inputs, tmp_path):
    model, data = inputs
    out = tmp_path / "run"

    class Fails(lema.Callback):
        def on_log(self, run, metrics):
            if run.step == 2:
                raise RuntimeError("my callback failed")

    with pytest.raises(RuntimeError, match="my callback failed"):
        lema.train(model, data, out, steps=4, save_steps=1, callbacks=[Fails()], echo=None, **RUN)
    assert (out / "checkpoint-1").is_dir() and not (out / "final").exists()
    result = lema.train(model, data, out, steps=4, save_steps=1, resume=True, echo=None, **RUN)  # the lock is free
    assert result.status == 0 and result.steps == 4 and result.checkpoint == out / "final"
