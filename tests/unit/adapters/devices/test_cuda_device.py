"""CudaDevice: pinned staging, copy stream, events (GPU tests skip without CUDA)."""

from __future__ import annotations

import pytest
import torch

from lema.errors import ConfigError


def test_importing_the_cuda_adapter_needs_no_gpu():
    import lema.adapters.devices.cuda as module

    assert hasattr(module, "CudaDevice")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_constructing_without_cuda_is_a_config_error():
    from lema.adapters.devices.cuda import CudaDevice

    with pytest.raises(ConfigError, match="CUDA is not available; use device='cpu'"):
        CudaDevice()


@pytest.mark.cuda
def test_staging_is_pinned_and_slots_live_on_the_gpu():
    from lema.adapters.devices.cuda import CudaDevice

    device = CudaDevice()
    host = device.host_buffer(1 << 20)
    slot = device.alloc(1 << 20, "slot 0")
    assert host.is_pinned() and slot.device.type == "cuda"
    device.free(slot)


@pytest.mark.cuda
def test_an_upload_waits_for_the_slots_last_compute():
    """The copy into a slot is ordered after the compute that was reading it (events, no host sync)."""
    from lema.adapters.devices.cuda import CudaDevice

    device = CudaDevice()
    n = 1 << 22
    slot = device.alloc(n, "slot")
    first, second = device.host_buffer(n), device.host_buffer(n)
    first.fill_(1)
    second.fill_(2)
    device.upload(first, slot, n).wait()
    big = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):  # keep the compute stream busy before reading the slot
        big = big @ big / 2048
    total = slot.to(torch.int64).sum()  # reads ones
    consumed = device.mark_consumed(slot)
    device.upload(second, slot, n, after=consumed).wait()
    torch.cuda.synchronize()
    assert int(total) == n
    assert int(slot.to(torch.int64).sum()) == 2 * n


@pytest.mark.cuda
def test_engine_streams_bit_identical_weights_to_the_gpu(tmp_path):
    from lema.adapters.devices.cuda import CudaDevice
    from lema.adapters.weights.safetensors_source import SafetensorsSource
    from lema.app.runtime.engine import Engine
    from tests.stream_models import write_model

    spec, root, state = write_model(tmp_path / "m", layers=4)
    device = CudaDevice()
    seen = []

    def compute(phase, unit, weights):
        for t in spec.units[unit].tensors:
            assert weights[t.key].is_cuda
            assert torch.equal(weights[t.key].cpu(), state[t.name])
        seen.append(unit)

    for prefetch in range(0, 6):
        with Engine(spec, SafetensorsSource(spec, root), device, prefetch=prefetch, resident_units=[3]) as engine:
            engine.run(compute, backward_units=range(1, 5))
    assert len(seen) == 6 * 9


# -- the CUDA device's sizes and orderings (issue 23), tested where no GPU is -----------------


def test_capacity_is_what_was_free_at_start_within_the_budget():
    from lema.adapters.devices.cuda_sizing import cuda_capacity

    gib = 1 << 30
    # another process holds 30 GiB of an 80 GiB card and the context 0.5: the rest is ours
    assert cuda_capacity(free=int(49.5 * gib), total=80 * gib) == int(49.5 * gib)
    assert cuda_capacity(free=int(49.5 * gib), total=80 * gib, budget=8 * gib) == 8 * gib
    assert cuda_capacity(free=int(49.5 * gib), total=80 * gib, budget=60 * gib) == int(49.5 * gib)
    # what this process's allocator holds already is ours too, never more than the card
    assert cuda_capacity(free=10 * gib, total=80 * gib, held=2 * gib) == 12 * gib
    assert cuda_capacity(free=79 * gib, total=80 * gib, held=4 * gib) == 80 * gib


def test_the_reserve_covers_workspaces_allocator_slack_and_nccl_with_peers():
    from lema.adapters.devices.cuda_sizing import ALLOCATOR_SLACK, NCCL_BUFFERS, WORKSPACE_PER_STREAM, cuda_reserve

    one = cuda_reserve(ranks=1)
    assert one == WORKSPACE_PER_STREAM + ALLOCATOR_SLACK
    assert cuda_reserve(ranks=2) == one + NCCL_BUFFERS == cuda_reserve(ranks=8)
    big = cuda_reserve(ranks=1, in_use=70 << 30)  # the slack grows with what is held: 2 % of 70 GiB
    assert big == WORKSPACE_PER_STREAM + int((70 << 30) * 0.02) > one


def test_readers_follow_the_cores():
    from lema.adapters.devices.cuda_sizing import reader_count

    assert [reader_count(c) for c in (1, 2, 4, 8, 16, 64)] == [2, 2, 2, 6, 14, 16]


def test_pinned_requests_lock_their_exact_size_not_a_power_of_two():
    from lema.adapters.devices.cuda_sizing import pinned_bytes

    layer = 404 * 10**6  # a Llama-2-7B layer in bf16
    assert pinned_bytes(layer, exact=False) == 512 << 20  # what torch's caching host allocator locks
    assert pinned_bytes(layer) == layer  # what CudaDevice.pinned_buffer locks (cudaHostRegister)
    assert pinned_bytes(0, exact=False) == 0 and pinned_bytes(1 << 20, exact=False) == 1 << 20


def test_the_cuda_device_declares_its_own_reserve_and_keeps_no_timeline_by_default():
    """Source-level contract (no GPU here): every stream the device orders on is its own
    device's, tickets carry their device, and record() does nothing unless asked."""
    import inspect

    from lema.adapters.devices import cuda

    source = inspect.getsource(cuda)
    assert ".current_stream()" not in source  # always current_stream(device)
    assert inspect.signature(cuda.CudaTicket).parameters.keys() == {"event", "device"}
    assert inspect.signature(cuda.CudaDevice).parameters["record_timeline"].default is False
    assert "mem_get_info" in inspect.getsource(cuda.CudaDevice.__init__)


@pytest.mark.cuda
def test_on_a_gpu_capacity_reserve_peaks_and_pinned_sizes_are_as_planned():
    from lema.adapters.devices.cuda import CudaDevice
    from lema.adapters.devices.cuda_sizing import cuda_reserve

    device = CudaDevice()
    free, _ = torch.cuda.mem_get_info(device.torch_device)
    assert device.capacity <= free + torch.cuda.memory_reserved(device.torch_device)
    assert device.traits.runtime_reserve == cuda_reserve(ranks=1, in_use=device.capacity)
    host = device.pinned_buffer(3 * (1 << 20) + 5)
    assert host.is_pinned() and host.numel() == 3 * (1 << 20) + 5
    slot = device.alloc(1 << 20, "slot")
    assert device.peak_bytes() >= device.peak_allocated_bytes() >= 1 << 20
    assert device.timeline() == ()
    device.free(slot)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_ticket_orders_the_compute_of_its_own_gpu_not_the_current_one():
    from lema.adapters.devices.cuda import CudaDevice

    device = CudaDevice(index=1)
    n = 64 << 20
    host, slot = device.host_buffer(n), device.alloc(n, "slot")
    host.fill_(3)
    ticket = device.upload(host, slot, n)
    with torch.cuda.device(0):  # the current GPU is another one
        ticket.wait()
        total = slot.to(torch.int64).sum()
    assert int(total) == 3 * n
