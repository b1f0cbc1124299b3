"""The engine's times and peaks are the device's own (issue 23): compute and wait seconds come
from the device's stopwatch (CUDA events on a GPU, where the host's clock only times kernel
launches), and the run's peak outlives the engine's per-pass reset."""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.adapters.devices.cpu import CpuDevice
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model

SEQ = 12


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    return save_monolithic(build_hf_model("llama", seed=1), tmp_path_factory.mktemp("time") / "model.safetensors")


def _batch(seed: int, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


class _TickingStopwatch:
    """One second of "device time" per interval, whatever the host's clock says."""

    def __init__(self) -> None:
        self.intervals, self.running = 0, False

    def start(self) -> None:
        assert not self.running, "started twice"
        self.running = True

    def stop(self) -> None:
        assert self.running, "stopped before it started"
        self.running, self.intervals = False, self.intervals + 1

    def seconds(self) -> float:
        return float(self.intervals)


class _TickingDevice(CpuDevice):
    """The CPU device with a stopwatch that ticks by intervals (stands in for CUDA events)."""

    def stopwatch(self) -> _TickingStopwatch:
        return _TickingStopwatch()


def _model(path, device, **overrides) -> LemaModel:
    cfg = dict(gbi_path=str(path), device="cpu", lora_rank=4, batch_size=2, max_seq_len=SEQ) | overrides
    return LemaModel(LemaConfig(**cfg), device=device)


def test_the_engine_times_compute_and_waits_with_the_devices_stopwatch(llama_file):
    """Streaming: every unit's forward and backward is one compute interval, and each waits
    for its fetched weights once; the report's seconds are the device's, not the host's."""
    with _model(llama_file, _TickingDevice(), strategy="streaming", prefetch_distance=1) as model:
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=1e-2))
        trainer.train_step(_batch(0))
        report = model.last_report
        n_layers = model.spec.n_layers
    computes = n_layers + 1 + n_layers  # forward of each layer and the head; backward of each layer
    assert report.compute_seconds == computes, report.compute_seconds
    # Each compute waits for its slot's upload, then (a no-op here) for an offloaded input.
    assert report.wait_seconds == 2 * computes, report.wait_seconds


def test_the_runs_peak_outlives_the_engines_per_pass_reset(llama_file):
    """A long batch then a short one: the second pass's peak is smaller, but the run's peak
    (what a user sizes a card by) is still the first one's, optimizer states included."""
    device = CpuDevice(count_compute=True)
    with _model(llama_file, device, max_seq_len=64) as model:
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
        trainer.train_step(_batch(0, batch=2, seq=64))
        long_peak = model.last_report.device_peak_bytes
        trainer.train_step(_batch(1, batch=1, seq=4))
        short_peak = model.last_report.device_peak_bytes
        assert short_peak < long_peak
        assert device.peak_bytes() < long_peak  # the pass's own, reset by the engine
        assert device.run_peak_bytes() >= long_peak


@pytest.mark.cuda
def test_on_a_gpu_the_stopwatch_times_the_device_not_the_launch():
    """``torch.cuda._sleep`` returns at once on the host and keeps the GPU busy: the CUDA
    stopwatch sees the device's time (tens of milliseconds), the host's clock only the launch."""
    import time

    from lema.adapters.devices.cuda import CudaDevice

    device = CudaDevice()
    watch = device.stopwatch()
    torch.cuda.synchronize()
    began = time.perf_counter()
    watch.start()
    torch.cuda._sleep(50_000_000)  # ~25-50 ms of GPU cycles
    watch.stop()
    launched = time.perf_counter() - began
    assert watch.seconds() > 5 * launched
    assert watch.seconds() > 0.005
    device.close()
