"""The read rate a run from the drive sees replaces the plan's after its first step from disk:
in the progress line's prediction, and in the per-drive cache the next plan reads."""

from __future__ import annotations

import json
import time

import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from lema.adapters.weights import read_rate as rr
from lema.app.training.step_time import DiskFeedback, predicted_step_seconds
from lema.domain.plan.disk_time import with_disk
from lema.domain.plan.timing import predict
from tests.integration.app.test_host_memory import FakeRam
from tests.integration.app.test_host_tier import model_file  # noqa: F401 - the fixture

IDS = torch.arange(1, 17).unsqueeze(0)


def _model(path, strategy=MemoryStrategy.STREAMING, budget="64M", left=110 << 20) -> LemaModel:
    return LemaModel(LemaConfig(gbi_path=str(path), device="cpu", max_seq_len=16, lora_rank=2, strategy=strategy,
                                vram_budget=budget), host_memory=FakeRam(left))


def test_the_first_step_from_disk_sets_the_rate_the_prediction_and_the_next_plan_use(model_file, tmp_path,  # noqa: F811
                                                                                     monkeypatch):
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    rr.store_run_rate(model_file, 1e15, 1, 1.0)  # a calibration far off: a drive of 1 PB/s
    with _model(model_file) as model:
        assert model.disk is not None and model.disk.keep is not None and model.disk.read_rate == 1e15
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1))
        planned = predicted_step_seconds(model)
        feedback = DiskFeedback(model)
        feedback.begin()
        t0 = time.perf_counter()
        trainer.train_step(IDS)
        predicted = feedback.after(time.perf_counter() - t0, planned)
        read, seconds = model.source.bytes_copied, model.source.read_seconds
        assert feedback.rate is not None and 0 < feedback.rate < 1e15
        assert model.disk.read_rate == feedback.rate and "seen by this run" in model.disk.rate_source
        assert predicted >= planned and predicted == predicted_step_seconds(model)
        assert predicted >= model.disk.seconds  # the drive's term at the rate seen
        assert seconds > 0 and read > 0
        feedback.begin()  # measured once: later steps change nothing
        trainer.train_step(IDS)
        assert feedback.after(1.0, predicted) == predicted
    data = json.loads(rr.cache_path(model_file).read_text())
    assert data["method"] == "run" and data["read_bytes_per_s"] == feedback.rate
    with _model(model_file) as again:  # the next plan on this drive uses the rate the run saw
        assert again.disk.read_rate == feedback.rate and "a run's step from disk" in again.disk.rate_source


def test_in_place_a_compute_bound_step_keeps_the_plans_rate(model_file, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    rr.store_run_rate(model_file, 1e15, 1, 1.0)
    with _model(model_file, budget=None, left=60 << 20) as model:  # in place: reads are page faults
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1))
        planned = predicted_step_seconds(model)
        feedback = DiskFeedback(model)
        feedback.begin()
        trainer.train_step(IDS)
        assert feedback.after(0.5, planned) == planned
        assert model.disk.read_rate == 1e15 and feedback.rate in (None, 0.0)
    assert json.loads(rr.cache_path(model_file).read_text())["read_bytes_per_s"] == 1e15


def test_a_model_that_fits_the_page_cache_is_left_alone(model_file, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    with _model(model_file, left=8 << 30) as model:
        feedback = DiskFeedback(model)
        assert not feedback.active and model.disk.keep is None
        feedback.begin()
        assert feedback.after(1.0, 2.0) == 2.0
        step = predict(model.plan(), model.spec)
        assert with_disk(step, model.disk) is step


def test_the_training_loop_shows_the_prediction_at_the_rate_its_first_step_saw(model_file, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    from lema.app.training.train_loop import LoopOptions, train_loop
    from lema.data.store import Example

    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    rr.store_run_rate(model_file, 1e15, 1, 1.0)
    lines: list[str] = []
    with _model(model_file) as model:
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1))
        planned = predicted_step_seconds(model)
        examples = [Example(tuple(range(1 + i, 17 + i)), tuple(range(1 + i, 17 + i))) for i in range(4)]
        train_loop(model, trainer, examples, 0, LoopOptions(out=tmp_path / "run", steps=3, batch=1, seq=16, lr=0.1,
                                                             log_every=1), None, echo=lines.append)
        assert model.disk.read_rate < 1e15 and "seen by this run" in model.disk.rate_source
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shown = [r["predicted_seconds"] for r in records if "predicted_seconds" in r]
    assert shown and all(p > planned for p in shown)  # from step 2: the drive's term at the rate step 1 saw
    assert json.loads(rr.cache_path(model_file).read_text())["method"] == "run"
    assert any("predicted" in x for x in lines)
