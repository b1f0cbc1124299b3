"""The drive's share of a step: reads in order, the page cache LEMA keeps, seconds per step."""

from __future__ import annotations

import pytest

from lema.domain.plan.disk_time import (
    DiskTime,
    cache_share,
    disk_bytes_per_step,
    disk_time,
    host_tier,
    step_reads,
    streams_from_disk,
    with_disk,
)

GIB = 1 << 30


def test_a_training_step_reads_forward_then_the_decoders_back_less_those_still_in_slots():
    assert step_reads((1, 2, 3, 4, 5), n_layers=4, training=True) == (1, 2, 3, 4, 5, 4, 3, 2, 1)
    assert step_reads((1, 2, 3, 4, 5), n_layers=4, training=True, kept_at_turn=2) == (1, 2, 3, 4, 5, 2, 1)
    assert step_reads((5, 3, 4), n_layers=4, training=False) == (3, 4, 5)


def test_steady_state_disk_bytes_follow_the_cache_lemma_keeps():
    reads = step_reads((1, 2, 3, 4, 5), n_layers=4, training=True)
    sizes = {u: 10 for u in range(1, 6)}
    assert disk_bytes_per_step(reads, sizes, keep=None) == 0  # it all fits: only the first step reads
    assert disk_bytes_per_step(reads, sizes, keep=0) == 90  # nothing kept: every read from the drive
    assert disk_bytes_per_step(reads, sizes, keep=50) == 0  # the whole model kept
    # 2 units kept: backward starts on the one unit forward read last that it reads again, forward on
    # the 2 backward read last: 3 of 9 reads hit
    assert disk_bytes_per_step(reads, sizes, keep=20) == 60
    # the last 3 units read are never dropped, whatever the keep
    assert disk_bytes_per_step(reads, sizes, keep=0, in_flight=3) == 40


def test_the_model_streams_from_disk_when_it_does_not_fit_beside_the_run():
    assert not streams_from_disk(10 * GIB, available=20 * GIB, run_host_bytes=2 * GIB)
    assert streams_from_disk(30 * GIB, available=20 * GIB, run_host_bytes=2 * GIB)
    assert cache_share(20 * GIB, 2 * GIB) == 9 * GIB
    assert cache_share(GIB, 2 * GIB) == 0


def test_disk_time_says_bytes_rate_seconds_and_whether_the_drive_sets_the_step():
    sizes = {u: GIB for u in range(1, 32)}
    reads = step_reads(tuple(sizes), n_layers=30, training=True)
    t = disk_time(reads, sizes, file_bytes=31 * GIB, available=20 * GIB, run_host_bytes=2 * GIB,
                  read_rate=2 * GIB, rate_source="measured")
    assert t.keep == 9 * GIB and t.bytes_per_step == (61 - 2 * 9) * GIB + GIB  # the head's unit is read once
    assert t.seconds == pytest.approx(t.bytes_per_step / (2 * GIB))
    assert t.disk_bound(compute_seconds=1.0) and not t.disk_bound(compute_seconds=100.0)
    assert t.disk_bound(None) is None
    line = t.line(compute_seconds=1.0)
    assert "does not fit the page cache" in line and "2.0 GiB/s (measured)" in line and "disk-bound" in line
    fits = disk_time(reads, sizes, file_bytes=31 * GIB, available=64 * GIB, run_host_bytes=2 * GIB, read_rate=1e9)
    assert fits.keep is None and fits.bytes_per_step == 0 and fits.seconds == 0
    assert "fits the page cache" in fits.line()
    unmeasured = DiskTime(GIB, 0.0, 0, "not measured")
    assert unmeasured.seconds == 0.0 and unmeasured.disk_bound(1.0) is None
    assert "read rate not measured" in unmeasured.line()


def test_auto_holds_the_first_decoders_that_fit_its_share_of_the_ram_left_and_streams_the_rest():
    sizes = {u: GIB for u in range(1, 50)}  # 48 layers and the head
    held = host_tier(tuple(sizes), n_layers=48, unit_bytes=sizes, available=30 * GIB, run_host_bytes=2 * GIB)
    assert held == tuple(range(1, 22))  # 3/4 of the 28 GiB left
    assert host_tier(tuple(sizes), 48, sizes, available=2 * GIB, run_host_bytes=2 * GIB) == ()
    # two ranks on the machine: each holds its own copy, in half the room
    assert host_tier(tuple(sizes), 48, sizes, available=30 * GIB, run_host_bytes=2 * GIB, ranks=2) == tuple(
        range(1, 11))
    small = {1: GIB, 2: GIB, 3: GIB // 2}
    assert host_tier((1, 2, 3), 2, small, available=4 * GIB, run_host_bytes=0) == (1, 2, 3)  # then the head
    reads = step_reads(tuple(sizes), n_layers=48, training=True)
    t = disk_time(reads, sizes, file_bytes=49 * GIB, available=30 * GIB, run_host_bytes=2 * GIB, read_rate=GIB,
                  held=held, layers=48)
    plain = disk_time(reads, sizes, file_bytes=49 * GIB, available=30 * GIB, run_host_bytes=2 * GIB, read_rate=GIB,
                      layers=48)
    assert t.held == held and t.held_bytes == 21 * GIB and t.streamed == 28
    assert t.keep == (30 - 2 - 21) * GIB // 2  # the page cache's share of what the tier leaves
    # no read of a held unit: 27 decoders twice (less what the share keeps) and the head once
    assert t.bytes_per_step == disk_bytes_per_step([u for u in reads if u not in held], sizes, t.keep)
    assert t.bytes_per_step < plain.bytes_per_step
    assert "AUTO holds 21 of 48 layers in host RAM (21.0 GiB); streams 28 units from disk" in t.line()


def test_the_drive_sets_the_step_when_its_reads_take_longer_than_the_compute():
    from lema.domain.model.spec import ModelSpec
    from lema.domain.plan.planner import TrainingShape, plan
    from lema.domain.plan.timing import predict
    from tests.streamed_steps import llama_config

    spec = ModelSpec.from_config({**llama_config(4, 512, 1408, 2000, 4), "torch_dtype": "float32"})
    step = predict(plan(spec, TrainingShape(batch=1, seq=16, device_kind="cpu")), spec)
    slow = DiskTime(int(GIB), GIB / (100 * step.step_seconds), 0, "measured")
    got = with_disk(step, slow)
    assert got.bound == "disk" and got.step_seconds == pytest.approx(slow.seconds) and got.disk_seconds == slow.seconds
    fast = DiskTime(1, 1e15, 0, "measured")
    assert with_disk(step, fast).step_seconds == step.step_seconds and with_disk(step, fast).bound == step.bound
    assert with_disk(step, None) is step and with_disk(step, DiskTime(0, 1e9, None)) is step


def test_replayed_through_the_schedule_a_compute_waiting_on_a_slot_still_being_read_shows():
    from lema.domain.model.spec import ModelSpec
    from lema.domain.plan.planner import Budget, TrainingShape, plan
    from lema.domain.plan.timing import predict
    from tests.streamed_steps import llama_config

    spec = ModelSpec.from_config({**llama_config(8, 512, 1408, 2000, 4), "torch_dtype": "float32"})
    p = plan(spec, TrainingShape(batch=1, seq=16, device_kind="cuda"), Budget(96 << 20))
    step = predict(p, spec)
    assert step.moved_bytes > 0
    # the drive twice as slow as the step: played, the compute after the last read adds to the drive's time
    disk = DiskTime(int(2 * step.step_seconds * 1e9), 1e9, 0, "measured")
    bare, played = with_disk(step, disk), with_disk(step, disk, p, spec)
    assert bare.step_seconds == pytest.approx(max(step.step_seconds, disk.seconds))
    assert played.step_seconds > bare.step_seconds
    assert played.disk_seconds == disk.seconds and played.rates == step.rates


def test_on_the_cpu_the_reads_and_the_compute_take_turns_on_the_cores():
    # The CPU computes on the cores that read the file (page faults, copies out of the page
    # cache): the drive's seconds add to the step instead of hiding it. On CUDA they overlap.
    from lema.domain.model.spec import ModelSpec
    from lema.domain.plan.planner import Budget, TrainingShape, plan
    from lema.domain.plan.timing import predict
    from tests.streamed_steps import llama_config

    spec = ModelSpec.from_config({**llama_config(8, 512, 1408, 2000, 4), "torch_dtype": "float32"})
    for kind, serial in (("cpu", True), ("cuda", False)):
        p = plan(spec, TrainingShape(batch=1, seq=16, device_kind=kind), Budget(96 << 20))
        step = predict(p, spec)
        disk = DiskTime(int(2 * step.step_seconds * 1e9), 1e9, 0, "measured")
        got = with_disk(step, disk, p, spec)
        if serial:
            assert got.step_seconds == pytest.approx(disk.seconds + step.step_seconds)
            assert got.bound == "disk" and got.share == pytest.approx(disk.seconds / got.step_seconds)
        else:
            assert got.step_seconds < disk.seconds + step.step_seconds
