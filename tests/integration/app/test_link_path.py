"""What crosses the host -> device link, and how many times each weight byte is copied.

A CpuDevice that plays a GPU (no direct reads; ``pinned_host`` for page-locked uploads)
counts every upload, and each weight source counts the host bytes it copies; the tests
check those counters, not timings.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.adapters.devices.cpu import CpuDevice
from lema.errors import LemaWarning
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model

STEPS = 3


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    return save_monolithic(build_hf_model("llama", seed=1), path)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(step))


def _run(path, strategy: str, device: CpuDevice):
    config = LemaConfig(gbi_path=str(path), device="cpu", lora_rank=4, seed=3, strategy=strategy, prefetch_distance=1)
    model = LemaModel(config, device=device)
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
    steps = []
    for step in range(STEPS):
        copied, uploaded = model.source.bytes_copied, device.bytes_uploaded
        trainer.train_step(_batch(step))
        device.synchronize()
        steps.append({"report": model.last_report, "copied": model.source.bytes_copied - copied,
                      "uploaded": device.bytes_uploaded - uploaded})
    adapters = [p.detach().clone() for p in model.get_trainable_parameters()]
    model.close()
    return steps, adapters


def test_resident_on_a_pinned_capable_device_makes_no_host_copy_of_weights(llama_file):
    device = CpuDevice(pinned_host=True)
    steps, adapters = _run(llama_file, "resident", device)
    assert device.host_buffers_allocated == 0  # no staging ring: nothing is ever staged
    for s in steps:
        assert s["copied"] == 0 and s["report"].bytes_read == 0  # uploads DMA from the source's buffers
        assert s["uploaded"] == s["report"].bytes_uploaded > 0
    _, streamed = _run(llama_file, "streaming", CpuDevice())
    assert all(torch.equal(a, b) for a, b in zip(adapters, streamed))


def test_streaming_copies_each_weight_byte_once_on_the_host(llama_file):
    steps, _ = _run(llama_file, "streaming", CpuDevice())
    for s in steps:
        # read from the file into staging once, uploaded once: nothing copied twice
        assert s["copied"] == s["report"].bytes_read == s["report"].bytes_uploaded == s["uploaded"] > 0


def test_resident_where_pinning_is_refused_warns_once_and_stages(llama_file):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps, adapters = _run(llama_file, "resident", CpuDevice(pinned_host=False))
    lema_warnings = [w for w in caught if issubclass(w.category, LemaWarning)]
    assert len(lema_warnings) == 1 and "pageable RAM" in str(lema_warnings[0].message)
    for s in steps:
        assert s["copied"] == s["report"].bytes_uploaded > 0  # the staging copy, once per byte
    _, streamed = _run(llama_file, "streaming", CpuDevice())
    assert all(torch.equal(a, b) for a, b in zip(adapters, streamed))


def test_the_report_gives_the_link_floor_of_a_simulated_link(llama_file):
    steps, _ = _run(llama_file, "streaming", CpuDevice(link_bandwidth=1e9))
    report = steps[-1]["report"]
    assert report.link_floor_seconds == pytest.approx(report.bytes_uploaded / 1e9)
    steps, _ = _run(llama_file, "streaming", CpuDevice())
    assert steps[-1]["report"].link_floor_seconds is None  # no link to speak of: memory is shared


def test_cpu_device_counts_the_compute_only_when_a_capacity_needs_it(llama_file):
    assert CpuDevice().count_compute is False
    assert CpuDevice(capacity=1 << 30).count_compute is True
    assert CpuDevice(count_compute=True).count_compute is True
    free, _ = _run(llama_file, "streaming", CpuDevice())
    counted, _ = _run(llama_file, "streaming", CpuDevice(count_compute=True))
    assert free[-1]["report"].peak_counts_compute is False
    assert counted[-1]["report"].peak_counts_compute is True
    # Without the counter the peak is what the device holds for the run, which the compute adds to.
    assert 0 < free[-1]["report"].device_peak_bytes < counted[-1]["report"].device_peak_bytes


@pytest.mark.parametrize("strategy", ["streaming", "resident"])
def test_the_cpu_training_for_real_computes_on_the_weights_in_place(llama_file, strategy):
    # Without a budget LemaModel's CPU device computes on the source's own tensors (the
    # mapped file's pages, RESIDENT's RAM copy): no slot, no copy, nothing uploaded.
    in_place = CpuDevice(direct_reads=True, in_place=True, count_compute=True)
    steps, adapters = _run(llama_file, strategy, in_place)
    for s in steps:
        assert s["copied"] == s["uploaded"] == s["report"].bytes_uploaded == s["report"].bytes_read == 0
    assert in_place.host_buffers_allocated == 0
    # the same adapters as the CPU standing in for a GPU (weights read into slots)
    _, slotted = _run(llama_file, strategy, CpuDevice(direct_reads=True))
    assert all(torch.equal(a, b) for a, b in zip(adapters, slotted))


def test_the_plan_of_weights_in_place_has_no_slots_and_matches_the_measured_peak(llama_file):
    config = LemaConfig(gbi_path=str(llama_file), device="cpu", lora_rank=4, seed=3, prefetch_distance=1,
                        batch_size=2, max_seq_len=12)
    default = LemaModel(config)  # what a user without --vram gets
    assert default.device.reads_in_place and not default.device.count_compute
    items = {i.name: i.bytes for i in default.plan().device_items}
    assert items["weight_slots"] == items["resident_weights"] == 0 and default.plan().transfer_bytes_per_step == 0
    default.close()
    counted = LemaModel(config, device=CpuDevice(direct_reads=True, in_place=True, count_compute=True))
    counted.initialize_lora()
    trainer = counted.get_trainer(torch.optim.AdamW(counted.get_trainable_parameters(), lr=1e-2))
    for step in range(2):
        trainer.train_step(_batch(step))
    assert counted.device.usage().keys().isdisjoint({"slot 0", "slot 1"})
    planned, peak = counted.plan().device_total, counted.device.peak_bytes()
    assert abs(peak - planned) / planned <= 0.10, (peak, planned)
    slotted = LemaModel(config, device=CpuDevice(direct_reads=True))
    assert slotted.plan().device_total - planned == 2 * slotted.plan().slot_bytes  # prefetch 1: two slots
    counted.close()
    slotted.close()


def test_a_simulated_link_behind_direct_reads_costs_its_time_and_no_second_copy(llama_file):
    # As on a GPU: the host copies each byte once (file -> slot, standing for the pinned
    # staging), and the link's time passes before the compute may use the slot.
    device = CpuDevice(direct_reads=True, link_bandwidth=1e9)
    steps, adapters = _run(llama_file, "streaming", device)
    for s in steps:
        assert s["copied"] == s["uploaded"] == s["report"].bytes_uploaded > 0
        assert s["report"].link_floor_seconds == pytest.approx(s["report"].bytes_uploaded / 1e9)
    assert device.host_buffers_allocated == 0
    events = [e for e in device.timeline() if e[0] in ("read_done", "upload_done", "compute_start")]
    for unit in {e[1] for e in events}:
        mine = [e for e in events if e[1] == unit]
        first_done = next(e for e in mine if e[0] == "upload_done")
        # the slot is used only once the link has carried it
        assert all(e[-1] >= first_done[-1] for e in mine if e[0] == "compute_start")
    _, plain = _run(llama_file, "streaming", CpuDevice())
    assert all(torch.equal(a, b) for a, b in zip(adapters, plain))


def test_a_model_file_cut_short_under_an_in_place_run_is_refused_by_name(tmp_path, llama_file):
    # Computing on the mapped file's pages, a page past a new end would kill the process
    # (SIGBUS): the source checks the file's length before it hands a unit over.
    import shutil

    from lema.errors import ModelFormatError

    path = shutil.copy(llama_file, tmp_path / "model.safetensors")
    config = LemaConfig(gbi_path=str(path), device="cpu", lora_rank=4, seed=3, prefetch_distance=1)
    model = LemaModel(config)
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
    trainer.train_step(_batch(0))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(ModelFormatError, match="changed on disk during the run"):
        trainer.train_step(_batch(1))
    model.close()
