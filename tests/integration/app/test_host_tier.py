"""AUTO's host tier: a model larger than the RAM the run may use, the units that fit held in
host RAM (read once), only the rest streamed from the file each step; adapters as the plain run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from lema.adapters.weights.tiered_source import TieredSource
from lema.domain.plan.disk_time import step_reads
from lema.domain.schedule.slot_layout import unit_buffer_bytes
from tests.integration.app.test_host_memory import FakeRam
from tests.streamed_steps import llama_config, write_model
from tests.tolerance import assert_close, rounding_floor

LAYERS = 6


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A 61 MiB fp32 model (6 layers of hidden 512, every layer dense)."""
    path = tmp_path_factory.mktemp("tier") / "m.safetensors"
    write_model(path, llama_config(LAYERS, 512, 1408, 2000, 4), "F32", dense=tuple(range(LAYERS)))
    return path


def _train(path: Path, strategy: MemoryStrategy, ram: FakeRam, budget: str | None, counts: list[int] | None = None):
    torch.manual_seed(0)
    with LemaModel(LemaConfig(gbi_path=str(path), device="cpu", max_seq_len=16, lora_rank=2, strategy=strategy,
                              vram_budget=budget), host_memory=ram) as model:
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1))
        ids = torch.arange(1, 17).unsqueeze(0)
        for _ in range(3):
            before = getattr(model.source, "bytes_streamed", 0)
            trainer.train_step(ids)
            if counts is not None:
                counts.append(model.source.bytes_streamed - before)
        adapters = torch.cat([p.detach().reshape(-1) for p in model.get_trainable_parameters()])
        return model.disk, model.source, model.plan(), adapters


@pytest.mark.parametrize("budget, left", [("48M", 120 << 20), ("64M", 110 << 20), (None, 60 << 20)])
def test_auto_holds_the_units_that_fit_in_host_ram_and_streams_only_the_rest(model_file, tmp_path, monkeypatch,
                                                                             budget, left):
    """Less RAM left than the 61 MiB model (beside the run's own): AUTO holds the planned units
    in RAM, every step asks the file for the other units' reads only (in place, every unit is
    read once at the start and the page cache does the rest), and the adapters are the plain
    streamed run's."""
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    ram = FakeRam(left)
    counts: list[int] = []
    disk, source, plan, tiered = _train(model_file, MemoryStrategy.AUTO, ram, budget, counts)
    assert isinstance(source, TieredSource) and disk is not None and disk.keep is not None
    assert source.held == disk.held and 0 < len(disk.held) < LAYERS
    assert source.held_bytes == disk.held_bytes and not source.pinned  # the CPU: plain RAM
    assert f"holds {sum(1 for u in disk.held if u <= LAYERS)} of {LAYERS} layers" in disk.line()
    assert "in host RAM" in disk.line() and "from disk" in disk.line()
    spec = source.spec
    unit_bytes = {u.index: unit_buffer_bytes(u) for u in spec.units}
    if budget is not None:
        # The bytes asked of the file per step: the streamed units' reads, none of a held unit.
        streamed = tuple(plan.streamed_units)
        kept_at_turn = max(0, plan.slot_count - (1 if LAYERS + 1 in streamed else 0))
        reads = [u for u in step_reads(streamed, LAYERS, True, kept_at_turn) if u not in disk.held]
        assert counts == [sum(unit_bytes[u] for u in reads)] * 3
        assert not set(disk.held) & set(reads) and set(disk.held) <= set(streamed)
    else:
        assert counts == [0, 0, 0]  # in place: every unit read once, at the start
    # The plain streamed run on the same machine: the same adapters.
    _, plain_source, _, plain = _train(model_file, MemoryStrategy.STREAMING, ram, budget)
    assert not isinstance(plain_source, TieredSource)
    assert_close(tiered, plain, floor=rounding_floor(torch.float32, 512, depth=2 * LAYERS + 2), what="adapters")
