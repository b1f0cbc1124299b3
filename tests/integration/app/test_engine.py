"""The engine over real sources and the CPU device: right weights, overlap, errors, counters."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.adapters.devices.cpu import CpuDevice
from lema.adapters.weights.resident_source import ResidentSource
from lema.adapters.weights.safetensors_source import SafetensorsSource
from lema.app.runtime.engine import Engine
from lema.domain.schedule.layer_schedule import Phase, expected_transfers, slot_count
from lema.domain.schedule.slot_layout import slot_bytes, unit_buffer_bytes
from lema.errors import ConfigError, DoesNotFitError, ModelFormatError
from tests.stream_models import write_model

LAYERS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    spec, root, state = write_model(tmp_path_factory.mktemp("engine") / "m", layers=LAYERS)
    return spec, root, state


def checker(spec, state, seen):
    def compute(phase, unit, weights):
        expected = spec.units[unit]
        assert set(weights) == {t.key for t in expected.tensors}, f"unit {unit} got another unit's keys"
        for t in expected.tensors:
            w = weights[t.key]
            assert w.dtype == state[t.name].dtype and torch.equal(w, state[t.name]), \
                f"{phase.value} of unit {unit}: {t.key} differs from the file"
        seen.append((phase, unit))
    return compute


@settings(max_examples=40)
@given(data=st.data())
def test_each_compute_sees_exactly_its_units_weights(model, data):
    """For every prefetch depth and resident set (the bug class: a depth that loads the wrong layer)."""
    spec, root, state = model
    streamable = list(range(1, LAYERS + 2))
    resident = sorted(data.draw(st.sets(st.sampled_from(streamable))))
    prefetch = data.draw(st.integers(0, LAYERS + 1))
    mode = data.draw(st.sampled_from(["train", "forward"]))
    method = data.draw(st.sampled_from(["pread", "mmap", "resident"]))
    source = ResidentSource.from_state_dict(spec, state) if method == "resident" else \
        SafetensorsSource(spec, root, method=method)
    backward = list(range(1, LAYERS + 1))
    seen: list = []
    with Engine(spec, source, CpuDevice(), prefetch=prefetch, resident_units=resident) as engine:
        for _ in range(2):
            seen.clear()
            report = engine.run(checker(spec, state, seen), mode=mode, backward_units=backward)
            order = [(Phase.FORWARD, u) for u in streamable]
            if mode == "train":
                order += [(Phase.BACKWARD, u) for u in reversed(backward)]
            assert seen == order
            units = tuple(streamable)
            n = expected_transfers(units, prefetch, frozenset(resident), mode, frozenset(backward))
            assert report.n_fetches == n
    source.close()


def test_byte_counters_follow_the_transfer_formula(model):
    spec, root, state = model
    device = CpuDevice()
    source = SafetensorsSource(spec, root)
    with Engine(spec, source, device, prefetch=1, resident_units=[1]) as engine:
        resident_bytes = engine.bytes_uploaded_total
        assert resident_bytes == unit_buffer_bytes(spec.units[1])
        reports = [engine.run(lambda *a: None, backward_units=range(1, LAYERS + 1)) for _ in range(3)]
        streamed = list(range(2, LAYERS + 2))
        # forward: every streamed unit; backward: decoders 4..2 minus layer 4, kept in a slot at the turn
        fetched = streamed + [u for u in streamed if u <= LAYERS and u != LAYERS]
        per_step = sum(unit_buffer_bytes(spec.units[u]) for u in fetched)
        assert [r.bytes_uploaded for r in reports] == [per_step] * 3
        assert [r.n_fetches for r in reports] == [len(fetched)] * 3
        assert engine.bytes_uploaded_total == resident_bytes + 3 * per_step
        assert device.bytes_uploaded == engine.bytes_uploaded_total


def test_staging_and_slots_are_allocated_once_per_engine(model):
    spec, root, state = model
    device = CpuDevice()
    source = ResidentSource.from_state_dict(spec, state)
    with Engine(spec, source, device, prefetch=2) as engine:
        after_build = device.current_bytes()
        for _ in range(3):
            engine.run(lambda *a: None)
        assert device.host_buffers_allocated == slot_count(LAYERS + 1, 2) == 3
        assert device.current_bytes() == after_build == 3 * slot_bytes(spec.units[1:])
        assert engine.run(lambda *a: None).device_peak_bytes == after_build
    assert device.current_bytes() == 0


def test_overlap_is_structural_the_next_fetch_is_issued_before_the_compute(model):
    spec, root, state = model
    device = CpuDevice(link_bandwidth=2e6)  # ~5 ms per layer
    source = SafetensorsSource(spec, root)
    with Engine(spec, source, device, prefetch=1) as engine:
        report = engine.run(lambda *a: None, mode="forward")
    events = report.timeline
    position = {(e[0], e[1]): i for i, e in enumerate(events) if e[0] in ("fetch_issued", "compute_start")}
    for unit in range(1, LAYERS + 1):
        assert position[("fetch_issued", unit + 1)] < position[("compute_start", unit)]
    uploads = [e for e in events if e[0] == "upload_done"]
    assert [e[1] for e in uploads] == list(range(1, LAYERS + 2))


def test_without_prefetch_each_fetch_waits_for_the_previous_compute(model):
    spec, root, state = model
    device = CpuDevice()
    with Engine(spec, ResidentSource.from_state_dict(spec, state), device, prefetch=0) as engine:
        events = engine.run(lambda *a: None, mode="forward").timeline
    position = {(e[0], e[1]): i for i, e in enumerate(events) if e[0] in ("fetch_issued", "compute_end")}
    for unit in range(1, LAYERS + 1):
        assert position[("compute_end", unit)] < position[("fetch_issued", unit + 1)]


@attrs.define
class FailingSource:
    """A weight source whose reads of one unit fail, like a file cut short on disk."""

    inner: object
    bad_unit: int
    spec: object = None

    def __attrs_post_init__(self):
        self.spec = self.inner.spec

    @property
    def bytes_copied(self):
        return self.inner.bytes_copied

    def read_unit(self, index, buffer=None):
        if index == self.bad_unit and buffer is not None:
            raise ModelFormatError(f"unit {index}: the file is truncated")
        return self.inner.read_unit(index, buffer)

    def host_unit(self, index):
        return None

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_a_read_error_on_the_prefetch_thread_reaches_the_caller(model, prefetch):
    spec, root, state = model
    source = FailingSource(ResidentSource.from_state_dict(spec, state), bad_unit=3)
    engine = Engine(spec, source, CpuDevice(), prefetch=prefetch)
    seen: list = []
    with pytest.raises(ModelFormatError, match="truncated"):
        engine.run(checker(spec, state, seen))
    assert seen == [(Phase.FORWARD, 1), (Phase.FORWARD, 2)]
    source.bad_unit = -1  # the engine keeps working after the error
    seen.clear()
    engine.run(checker(spec, state, seen), mode="forward")
    assert len(seen) == LAYERS + 1
    engine.close()
    assert not engine._thread.is_alive()


def test_a_compute_error_reaches_the_caller_and_the_engine_recovers(model):
    spec, root, state = model

    def boom(phase, unit, weights):
        if unit == 2:
            raise RuntimeError("compute failed")

    with Engine(spec, SafetensorsSource(spec, root), CpuDevice(), prefetch=2) as engine:
        with pytest.raises(RuntimeError, match="compute failed"):
            engine.run(boom)
        seen: list = []
        engine.run(checker(spec, state, seen))
        assert len(seen) == 2 * (LAYERS + 1)  # the head has a backward too by default


@attrs.frozen
class Plan:
    device_total: int
    fits: bool = True


def test_a_plan_larger_than_the_capacity_is_refused_before_allocating(model):
    spec, root, state = model
    source = ResidentSource.from_state_dict(spec, state)
    need = 2 * slot_bytes(spec.units[1:])
    device = CpuDevice(capacity=need)
    with Engine(spec, source, device, prefetch=1, plan=Plan(need)) as engine:
        engine.run(lambda *a: None)
    small = CpuDevice(capacity=int(need * 0.97))
    with pytest.raises(DoesNotFitError, match="capacity"):
        Engine(spec, source, small, prefetch=1, plan=Plan(need))
    assert small.peak_bytes() == 0 and small.host_buffers_allocated == 0


def test_bad_engine_arguments_raise_config_error(model):
    spec, root, state = model
    source = ResidentSource.from_state_dict(spec, state)
    with pytest.raises(ConfigError, match="prefetch"):
        Engine(spec, source, CpuDevice(), prefetch=-1)
    with pytest.raises(ConfigError, match="both resident and streamed"):
        Engine(spec, source, CpuDevice(), prefetch=1, resident_units=[2], streamed_units=[1, 2])
    engine = Engine(spec, source, CpuDevice(), prefetch=1)
    engine.close()
    with pytest.raises(ConfigError, match="closed"):
        engine.run(lambda *a: None)


# -- activation offload (issue 14) ------------------------------------------------------------


class Inputs:
    """A toy pass that keeps one 'checkpointed input' per decoder unit, like TrainingPass."""

    def __init__(self, n_layers: int, device: CpuDevice) -> None:
        self.n_layers, self.device = n_layers, device
        self.saved: dict[int, torch.Tensor] = {}
        self.seen: list[tuple[str, int]] = []

    def take_input(self, unit):
        return self.saved.pop(unit)

    def give_input(self, unit, x):
        self.saved[unit] = x

    def __call__(self, phase, unit, weights):
        if unit > self.n_layers:
            return
        if phase is Phase.FORWARD:
            with self.device.measuring():
                self.saved[unit] = torch.full((3, 1000), float(unit))
        else:
            x = self.saved.pop(unit)
            assert x.shape == (3, 1000) and torch.equal(x, torch.full((3, 1000), float(unit))), unit
            self.seen.append((phase.value, unit))


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_offloaded_inputs_come_back_intact_and_stop_counting_meanwhile(model, prefetch):
    spec, root, state = model
    device = CpuDevice(link_bandwidth=2e9, count_compute=True)
    source = ResidentSource.from_state_dict(spec, state)
    decoders = list(range(1, LAYERS + 1))
    with Engine(spec, source, device, prefetch=prefetch, offload_inputs=True) as engine:
        for _ in range(2):  # host buffers are allocated once and reused
            store = Inputs(LAYERS, device)
            before = device.current_bytes()
            report = engine.run(store, backward_units=decoders, inputs=store)
            assert store.seen == [("backward", u) for u in reversed(decoders)] and not store.saved
            kept = 1 if prefetch == 0 else 2
            assert report.activation_bytes == (LAYERS - kept) * 3 * 1000 * 4
            # inputs on the device at once: the kept ones, plus one in flight either way
            assert report.device_peak_bytes - before <= (kept + 1) * 12000 + slot_count(LAYERS + 1, prefetch) * \
                slot_bytes(spec.units[1:])
            assert device.current_bytes() == before  # every fetched input was freed after its backward
        assert device.bytes_downloaded == 2 * report.activation_bytes
    kinds = [e[0] for e in report.timeline]
    assert kinds.count("download_done") == LAYERS - kept and kinds.count("upload_done") >= LAYERS - kept


def test_an_offloading_engine_needs_the_pass_inputs_and_recovers_after_an_error(model):
    spec, root, state = model
    device = CpuDevice()
    source = ResidentSource.from_state_dict(spec, state)
    decoders = list(range(1, LAYERS + 1))
    with Engine(spec, source, device, prefetch=1, offload_inputs=True) as engine:
        with pytest.raises(ConfigError, match="inputs="):
            engine.run(lambda *a: None, backward_units=decoders)
        engine.run(lambda *a: None, mode="forward")  # a forward pass moves no inputs
        store = Inputs(LAYERS, device)

        def failing(phase, unit, weights):
            if phase is Phase.BACKWARD and unit == 2:
                raise RuntimeError("backward failed")
            store(phase, unit, weights)

        with pytest.raises(RuntimeError, match="backward failed"):
            engine.run(failing, backward_units=decoders, inputs=store)
        store = Inputs(LAYERS, device)
        before = device.current_bytes()
        engine.run(store, backward_units=decoders, inputs=store)
        assert store.seen == [("backward", u) for u in reversed(decoders)]
        assert device.current_bytes() == before
