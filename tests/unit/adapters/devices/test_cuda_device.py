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
