"""One contract, every Device adapter: same results for the same schedule, counted memory, a capacity."""

from __future__ import annotations

import pytest
import torch

from lema.adapters.devices.cpu import CpuDevice
from lema.adapters.weights.resident_source import ResidentSource
from lema.app.runtime.engine import Engine
from lema.errors import DeviceOutOfMemory
from tests.stream_models import stream_config, write_model


def make_device(kind: str, capacity: int | None = None):
    if kind == "cpu":
        return CpuDevice(capacity=capacity, count_compute=True)
    from lema.adapters.devices.cuda import CudaDevice

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    return CudaDevice(capacity=None if capacity is None else base + capacity)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    dev = make_device(request.param)
    yield dev
    dev.close()


def checksums(spec, source, device, prefetch, resident=()):
    """A toy compute: per unit and phase, the integer sum of its weight bytes, on the device."""
    out = []

    def compute(phase, unit, weights):
        total = torch.zeros((), dtype=torch.int64, device=device.torch_device)
        for key in sorted(weights):
            total += weights[key].contiguous().view(torch.uint8).to(torch.int64).sum()
        out.append((phase.value, unit, int(total)))

    with Engine(spec, source, device, prefetch=prefetch, resident_units=resident) as engine:
        engine.run(compute, backward_units=list(range(1, spec.n_layers + 1)))
    return out


def test_the_same_schedule_gives_the_same_results_as_the_host(tmp_path, device):
    spec, root, state = write_model(tmp_path / "m", layers=4)
    source = ResidentSource.from_state_dict(spec, state)
    expected = {u.index: sum(int(state[t.name].contiguous().view(torch.uint8).to(torch.int64).sum())
                             for t in u.tensors) for u in spec.units}
    for prefetch, resident in [(0, ()), (2, (2,)), (5, (1, 5))]:
        got = checksums(spec, source, device, prefetch, resident)
        assert [(p, u) for p, u, _ in got] == [("forward", u) for u in range(1, 6)] + \
            [("backward", u) for u in range(4, 0, -1)]
        assert all(total == expected[u] for _, u, total in got)


def test_upload_copies_bytes_after_the_ticket(device):
    host = device.host_buffer(1000)
    host.copy_(torch.arange(1000) % 251)
    slot = device.alloc(1024, "slot")
    ticket = device.upload(host, slot, 1000, label="x")
    device.host_reusable(ticket)
    ticket.wait()
    consumed = device.mark_consumed(slot)
    again = device.upload(host, slot, 10, after=consumed)
    again.wait()
    device.synchronize()
    assert torch.equal(slot[:1000].cpu(), host)
    device.free(slot)


def test_download_then_upload_round_trips_an_activation(device):
    """Offload and fetch back (the engine's activation steps): same bytes, in link order."""
    x = torch.randn(3, 50, device=device.torch_device)
    host = device.host_buffer(x.numel() * 4)
    down = device.download(x.view(-1).view(torch.uint8), host, x.numel() * 4, label="x1")
    back = device.alloc(x.numel() * 4, "input 1")
    up = device.upload(host, back, x.numel() * 4, after=device.mark_consumed(back), label="x1")
    up.wait()
    device.synchronize()
    assert down.done()
    assert torch.equal(back.view(torch.float32).view(3, 50), x)
    device.free(back)


def test_alloc_and_free_are_counted(device):
    before = device.current_bytes()
    device.reset_peak()
    slot = device.alloc(1 << 20, "slot 0")
    assert device.current_bytes() - before >= 1 << 20
    device.free(slot)
    del slot
    assert device.peak_bytes() - before >= 1 << 20
    assert device.current_bytes() == before


@pytest.mark.parametrize("kind", DEVICES)
def test_capacity_exceeded_names_the_request_and_the_capacity(kind):
    device = make_device(kind, capacity=1 << 20)
    keep = device.alloc(600_000, "slot 0")
    with pytest.raises(DeviceOutOfMemory) as info:
        device.alloc(600_000, "slot 1")
    message = str(info.value)
    assert "slot 1" in message and "600000 bytes" in message and "capacity" in message
    assert isinstance(info.value, MemoryError)
    device.free(keep)
    device.close()


def test_measuring_counts_a_matmuls_output(device):
    a = torch.randn(256, 256, device=device.torch_device)
    warm = a @ a  # a first matmul may set up lasting library workspaces (cuBLAS)
    del warm
    device.synchronize()
    before = device.current_bytes()
    device.reset_peak()
    with device.measuring():
        y = a @ a
        during = device.current_bytes()
    assert during - before >= y.numel() * 4
    del y
    assert device.current_bytes() == before
    assert device.peak_bytes() - before >= 256 * 256 * 4


def test_engine_slots_fill_the_capacity_exactly_and_one_byte_less_refuses(tmp_path):
    config = stream_config(3)
    spec, root, state = write_model(tmp_path / "m", layers=3)
    source = ResidentSource.from_state_dict(spec, state)
    probe = CpuDevice()
    with Engine(spec, source, probe, prefetch=1, resident_units=[2]):
        need = probe.peak_bytes()
    assert config["num_hidden_layers"] == 3
    with Engine(spec, source, CpuDevice(capacity=need), prefetch=1, resident_units=[2]) as engine:
        engine.run(lambda *a: None)
    with pytest.raises(DeviceOutOfMemory, match="capacity"):
        Engine(spec, source, CpuDevice(capacity=need - 1), prefetch=1, resident_units=[2])


# -- CpuDevice specifics: the compute accounting the planner is checked against -------------


def test_cpu_measuring_counts_autograd_saved_tensors_until_the_graph_is_freed():
    device = CpuDevice(count_compute=True)
    w = torch.randn(128, 128, requires_grad=True)
    x = torch.randn(64, 128)
    with device.measuring():
        h = torch.sin(x @ w)  # sin saves its input, the matmul's output, for backward
        loss = h.sum()
        held = device.current_bytes()
        assert held >= 2 * 64 * 128 * 4
        del h
        assert device.current_bytes() == held - 64 * 128 * 4  # the saved matmul output stays
        loss.backward()  # backward runs in this thread, under the mode
        assert w.grad is not None
    del loss
    grad_bytes = w.grad.untyped_storage().nbytes()
    assert device.current_bytes() == grad_bytes  # only the gradient outlives the graph
    assert device.peak_bytes() >= held - 64 * 128 * 4 + grad_bytes  # saved input and gradient at once


def test_cpu_measuring_does_not_count_views_or_inputs_twice():
    device = CpuDevice(count_compute=True)
    x = torch.randn(1000)
    with device.measuring():
        y = x * 2
        views = [y[10:], y.view(10, 100), y.t() if y.dim() == 2 else y[::2]]
        x.add_(1)
    assert device.current_bytes() == 4000
    del y
    assert device.current_bytes() == 4000  # the views keep the storage alive
    del views
    assert device.current_bytes() == 0


def test_cpu_measuring_refuses_an_allocation_past_the_capacity():
    device = CpuDevice(capacity=60_000)
    a = torch.randn(100, 100)
    with pytest.raises(DeviceOutOfMemory, match="compute"):
        with device.measuring():
            a @ a @ a  # two 40 kB products alive at once
    assert device.current_bytes() <= 60_000


def test_cpu_simulated_link_records_upload_times_in_order():
    device = CpuDevice(link_bandwidth=1e7)
    host = device.host_buffer(100_000)
    slot = device.alloc(100_000, "slot")
    tickets = [device.upload(host, slot, 100_000, label=i) for i in range(3)]
    for t in tickets:
        t.wait()
    done = [e for e in device.timeline() if e[0] == "upload_done"]
    assert [e[1] for e in done] == [0, 1, 2]
    assert done[-1][-1] - done[0][-1] >= 0.015  # two more 10 ms transfers
    device.close()


def test_cpu_offloaded_bytes_stop_counting_once_copied_and_released():
    device = CpuDevice(link_bandwidth=1e9, count_compute=True)
    host = device.host_buffer(1 << 20)
    with device.measuring():
        x = torch.ones(1 << 18)  # 1 MiB, counted
        counted = device.current_bytes()
        ticket = device.download(x.view(torch.uint8), host, 1 << 20, label="x1")
        del x
        ticket.wait()
        device.synchronize()
        after = device.current_bytes()
    assert counted - after == 1 << 20
    assert device.bytes_downloaded == 1 << 20 and host.view(torch.float32).eq(1).all()
    assert [e[:2] for e in device.timeline() if e[0] == "download_done"] == [("download_done", "x1")]
    device.close()
