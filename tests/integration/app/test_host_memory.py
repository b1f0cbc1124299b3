"""RESIDENT on a model larger than the host RAM left: refused by the plan, before anything loads."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lema import LemaConfig, LemaModel, MemoryStrategy
from lema.adapters.host_memory import ProcMeminfo
from lema.errors import HostMemoryError
from tests.demo_models import byte_tokenizer
from tests.sparse_models import write_sparse_safetensors
from tests.streamed_steps import llama_config

GIB = 1 << 30


class FakeRam:
    """A machine with ``available`` bytes of RAM left."""

    def __init__(self, available: int) -> None:
        self.available = available

    def available_bytes(self) -> int:
        return self.available

    def describe(self) -> str:
        return "a fake machine"


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A sparse 3.5 GiB bf16 model (a header and a hole: no disk used)."""
    config = llama_config(8, 4096, 11008, 32000, 32)
    return write_sparse_safetensors(tmp_path_factory.mktemp("big") / "m.safetensors", config, "BF16")


def _anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_resident_larger_than_the_ram_left_is_refused_at_once_naming_both_sizes(big):
    before, start = _anon(), time.perf_counter()
    with pytest.raises(HostMemoryError, match=r"RESIDENT needs \d+\.\d+ GiB of host RAM .*but this machine has "
                                              r"1\.0 GiB available \(a fake machine\); use strategy STREAMING") as e:
        LemaModel(LemaConfig(gbi_path=str(big), device="cpu", strategy=MemoryStrategy.RESIDENT, max_seq_len=16),
                  host_memory=FakeRam(GIB))
    assert time.perf_counter() - start < 1.0
    assert _anon() - before < 64 << 20  # nothing was loaded
    assert e.value.needed > 3 * GIB and e.value.available == GIB
    assert "\n" not in str(e.value)


def test_the_same_model_streams_on_that_machine_and_a_ram_budget_counts(big):
    with LemaModel(LemaConfig(gbi_path=str(big), device="cpu", max_seq_len=16), host_memory=FakeRam(GIB)) as model:
        assert model.plan().fits
    with pytest.raises(HostMemoryError, match=r"available \(ram_budget\)"):
        LemaModel(LemaConfig(gbi_path=str(big), device="cpu", strategy=MemoryStrategy.RESIDENT, max_seq_len=16,
                             ram_budget="1G"), host_memory=FakeRam(64 * GIB))


def test_meminfo_and_a_cgroup_limit_give_the_ram_left(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    assert ProcMeminfo(str(meminfo), str(cgroup)).available_bytes() == 20000000 * 1024
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("100\n")
    assert ProcMeminfo(str(meminfo), str(cgroup)).available_bytes() == 20000000 * 1024
    (cgroup / "memory.max").write_text(f"{8 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{GIB}\n")
    ram = ProcMeminfo(str(meminfo), str(cgroup))
    assert ram.available_bytes() == 7 * GIB and "cgroup" in ram.describe()


def test_lema_train_refuses_resident_on_a_file_larger_than_this_machine_with_exit_2(tmp_path):
    total = ProcMeminfo().available_bytes()
    layers = int(1.3 * total / ((4 * 4096 * 4096 + 3 * 4096 * 11008) * 2)) + 1
    model = write_sparse_safetensors(tmp_path / "m.safetensors", llama_config(layers, 4096, 11008, 32000, 32),
                                     "BF16")
    byte_tokenizer().save_pretrained(str(tmp_path / "tok"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n' * 4)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lema.cli", "train", "--model", str(model), "--data", str(data),
                           "--tokenizer", str(tmp_path / "tok"),
                           "--strategy", "resident", "--device", "cpu", "--steps", "1", "--seq", "16",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "RESIDENT needs" in done.stderr and "of host RAM" in done.stderr and "Traceback" not in done.stderr
    assert time.perf_counter() - start < 60  # interpreter and torch start-up included


@pytest.mark.parametrize("budget, left", [(None, 60 << 20), ("64M", 100 << 20)])
def test_a_model_larger_than_the_ram_left_streams_from_the_drive_keeping_a_share_cached(tmp_path, monkeypatch,
                                                                                       budget, left):
    """On a machine with less RAM left than the model: the plan says what the drive costs per
    step, the source drops the file's pages beyond LEMA's share, and training works."""
    import torch

    from tests.streamed_steps import write_model

    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.safetensors"
    write_model(path, llama_config(6, 512, 1408, 2000, 4), "F32", dense=tuple(range(6)))
    ram = FakeRam(left)  # the model is 61 MiB; under the budget the run itself needs 76 MiB
    with LemaModel(LemaConfig(gbi_path=str(path), device="cpu", max_seq_len=16, lora_rank=2, vram_budget=budget),
                   host_memory=ram) as model:
        disk = model.disk
        assert disk is not None and disk.keep is not None and disk.bytes_per_step > 0
        assert model.source.keep_bytes == disk.keep
        line = disk.line()
        assert "does not fit the page cache" in line and "per step" in line
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1))
        losses = [trainer.train_step(torch.arange(1, 17).unsqueeze(0))[1] for _ in range(2)]
        assert losses[1] < losses[0]
        assert model.source.bytes_dropped > 0
