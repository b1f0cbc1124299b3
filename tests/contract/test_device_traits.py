"""Every Device adapter declares what it is: one DeviceTraits record, agreeing with its kind's."""

from __future__ import annotations

import pytest

from lema.adapters.devices.cpu import CpuDevice
from lema.domain.device_traits import DEVICE_KINDS, DeviceTraits
from lema.ports.device import Device
from tests.contract.test_devices import DEVICES, make_device

PLANNED = ("host_memory", "pinned_host", "runtime_reserve", "foreach_optimizer", "dequantizes_in_place")


@pytest.mark.parametrize("kind", DEVICES)
def test_a_device_declares_traits_that_plan_as_its_kind(kind):
    device = make_device(kind)
    try:
        assert isinstance(device, Device)
        traits = device.traits
        assert isinstance(traits, DeviceTraits)
        assert traits.kind == kind
        planned = DEVICE_KINDS[traits.kind]
        assert {f: getattr(traits, f) for f in PLANNED} == {f: getattr(planned, f) for f in PLANNED}
    finally:
        device.close()


@pytest.mark.parametrize(("options", "expected"), [
    ({}, {"in_place": False, "direct_reads": False, "simulated_link": False, "counts_compute": False}),
    ({"in_place": True}, {"in_place": True, "direct_reads": False, "simulated_link": False}),
    ({"in_place": True, "link_bandwidth": 1e9}, {"in_place": False, "simulated_link": True}),
    ({"direct_reads": True, "capacity": 1 << 20}, {"direct_reads": True, "counts_compute": True}),
])
def test_the_cpu_device_says_how_it_runs(options, expected):
    device = CpuDevice(**options)
    try:
        assert {f: getattr(device.traits, f) for f in expected} == expected
        assert device.traits.host_memory
    finally:
        device.close()
