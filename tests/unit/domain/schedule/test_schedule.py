"""Properties of the layer schedule (issue #3): what the engine may rely on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lema.domain.schedule.layer_schedule import (
    Compute,
    Fetch,
    FetchInput,
    OffloadInput,
    Phase,
    Release,
    build_schedule,
    expected_transfers,
    input_depth,
    kept_inputs,
    slot_count,
    transfer_count,
)
from lema.errors import ConfigError


@st.composite
def passes(draw, modes=("train", "forward")):
    """(units, prefetch, resident, mode, backward_units) over 1..12 layers plus a head."""
    n_layers = draw(st.integers(1, 12))
    units = list(range(1, n_layers + 2))  # decoders 1..L and the head L+1
    resident = frozenset(draw(st.sets(st.sampled_from(units))))
    n_streamed = len(units) - len(resident)
    prefetch = draw(st.integers(0, max(n_streamed, 1)))
    mode = draw(st.sampled_from(modes))
    backward = draw(st.sampled_from(["all", "decoders", "random"]))
    if backward == "all":
        backward_units = None
    elif backward == "decoders":
        backward_units = frozenset(units[:-1])
    else:
        backward_units = frozenset(draw(st.sets(st.sampled_from(units))))
    return units, prefetch, resident, mode, backward_units


def compute_order(units, mode, backward_units):
    back = set(units) if backward_units is None else backward_units
    forward = [(u, Phase.FORWARD) for u in units]
    return forward + ([(u, Phase.BACKWARD) for u in reversed(units) if u in back] if mode == "train" else [])


def replay(steps, n_slots, resident):
    """Walk the steps like the engine; assert slot safety; return the max occupied slots."""
    content: dict[int, int] = {}  # slot -> unit whose bytes it holds
    occupied: set[int] = set()
    most = 0
    for step in steps:
        if isinstance(step, Fetch):
            assert step.unit not in resident, f"resident unit {step.unit} fetched"
            assert 0 <= step.slot < n_slots
            assert step.slot not in occupied, f"{step} overwrites a slot that was not released"
            content[step.slot] = step.unit
            occupied.add(step.slot)
            most = max(most, len(occupied))
        elif isinstance(step, Compute):
            if step.unit in resident:
                assert step.slot is None
            else:
                assert step.slot in occupied, f"{step}: its slot was released before the compute"
                assert content[step.slot] == step.unit, f"{step}: slot holds unit {content[step.slot]}"
        else:
            assert isinstance(step, Release)
            assert step.slot in occupied and content[step.slot] == step.unit, f"{step} releases a free slot"
            occupied.discard(step.slot)
    assert not occupied, f"slots {sorted(occupied)} never released"
    return most


@given(passes())
def test_every_compute_reads_its_own_fetch_and_slots_stay_within_the_plan(case):
    units, prefetch, resident, mode, backward = case
    steps = build_schedule(units, prefetch, resident, mode, backward)
    n_slots = slot_count(len([u for u in units if u not in resident]), prefetch)
    assert replay(steps, n_slots, resident) <= n_slots


@given(passes())
def test_computes_run_forward_then_backward_in_reverse(case):
    units, prefetch, resident, mode, backward = case
    steps = build_schedule(units, prefetch, resident, mode, backward)
    assert [(s.unit, s.phase) for s in steps if isinstance(s, Compute)] == compute_order(units, mode, backward)


@given(passes(modes=("train",)))
def test_streamed_units_are_fetched_at_most_twice_and_resident_never(case):
    units, prefetch, resident, mode, backward = case
    steps = build_schedule(units, prefetch, resident, mode, backward)
    for u in units:
        n = sum(1 for s in steps if isinstance(s, Fetch) and s.unit == u)
        assert n == 0 if u in resident else 1 <= n <= 2


@given(passes())
def test_units_still_in_slots_at_the_turn_are_not_fetched_again(case):
    units, prefetch, resident, mode, backward = case
    steps = build_schedule(units, prefetch, resident, mode, backward)
    assert transfer_count(steps) == expected_transfers(units, prefetch, resident, mode, backward)


@given(passes())
def test_fetches_run_prefetch_computes_ahead(case):
    """Before the compute of a streamed use, the fetches of the next `prefetch` uses are issued."""
    units, prefetch, resident, mode, backward = case
    steps = build_schedule(units, prefetch, resident, mode, backward)
    computes = [i for i, s in enumerate(steps) if isinstance(s, Compute) and s.slot is not None]
    fetch_at = {}
    for i, s in enumerate(steps):
        if isinstance(s, Fetch):
            fetch_at.setdefault(s.unit, []).append(i)
    for k, at in enumerate(computes):
        for later in computes[k + 1:k + 1 + prefetch]:
            unit = steps[later].unit
            before_later = [f for f in fetch_at[unit] if f < later]
            assert before_later and before_later[-1] < at, f"fetch for step {later} not issued before step {at}"
    if prefetch == 0:  # serial: each fetch is followed directly by the compute that reads it
        for i, s in enumerate(steps):
            if isinstance(s, Fetch):
                nxt = next(t for t in steps[i + 1:] if isinstance(t, Compute))
                assert nxt.unit == s.unit


@pytest.mark.parametrize("prefetch", range(0, 6))
def test_every_prefetch_depth_streams_a_five_layer_model(prefetch):
    units = [1, 2, 3, 4, 5, 6]
    steps = build_schedule(units, prefetch, backward_units=frozenset(units[:-1]))
    n_slots = slot_count(6, prefetch)
    assert replay(steps, n_slots, frozenset()) <= n_slots
    kept = min(n_slots, 6) - 1  # the head is not in backward
    assert transfer_count(steps) == 6 + 5 - kept


def test_prefetch_zero_fetches_then_computes_serially_with_one_slot():
    steps = build_schedule([1, 2], 0, mode="forward")
    assert [str(s) for s in steps] == ["fetch 1->0", "forward 1@0", "release 1@0",
                                       "fetch 2->0", "forward 2@0", "release 2@0"]


def test_resident_units_are_computed_without_slots():
    steps = build_schedule([1, 2, 3], 1, resident=frozenset({2}), mode="forward")
    assert Compute(2, Phase.FORWARD, None) in steps
    assert all(s.unit != 2 for s in steps if isinstance(s, (Fetch, Release)))


@pytest.mark.parametrize("kwargs, match", [
    ({"prefetch": -1}, "prefetch"),
    ({"prefetch": 1, "mode": "eval"}, "mode"),
    ({"prefetch": 1, "backward_units": frozenset({9})}, "backward_units"),
])
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_schedule([1, 2], **kwargs)


# -- activation offload -------------------------------------------------------------------------


def _backward_order(units, backward_units):
    back = set(units) if backward_units is None else backward_units
    return [u for u in reversed(units) if u in back]


@given(passes(modes=("train",)))
def test_offloaded_inputs_leave_after_their_forward_and_return_before_their_backward(case):
    units, prefetch, resident, mode, backward_units = case
    steps = build_schedule(units, prefetch, resident, mode, backward_units, offload_inputs=True)
    plain = build_schedule(units, prefetch, resident, mode, backward_units)
    # the weights' steps are unchanged
    assert [s for s in steps if not isinstance(s, (OffloadInput, FetchInput))] == list(plain)
    order = _backward_order(units, backward_units)
    kept = kept_inputs(len(order), prefetch)
    offloaded = order[kept:]
    where: dict[int, str] = {}  # unit -> "device" | "host"
    most = 0
    for step in steps:
        if isinstance(step, Compute) and step.phase is Phase.FORWARD and step.unit in order:
            where[step.unit] = "device"
        elif isinstance(step, OffloadInput):
            assert where.get(step.unit) == "device", f"{step} before its forward"
            where[step.unit] = "host"
        elif isinstance(step, FetchInput):
            assert where.get(step.unit) == "host", f"{step} of an input not offloaded"
            where[step.unit] = "device"
        elif isinstance(step, Compute) and step.phase is Phase.BACKWARD:
            assert where.get(step.unit) == "device", f"{step} without its input on the device"
            held = sum(1 for u, w in where.items() if w == "device")
            most = max(most, held)
            del where[step.unit]
    assert not where
    assert sorted(s.unit for s in steps if isinstance(s, OffloadInput)) == sorted(offloaded)
    assert sorted(s.unit for s in steps if isinstance(s, FetchInput)) == sorted(offloaded)
    if order:
        assert most == kept  # the inputs on the device during the backward never exceed the kept ones


@given(passes(modes=("train",)))
def test_inputs_are_fetched_input_depth_computes_ahead(case):
    units, prefetch, resident, mode, backward_units = case
    steps = build_schedule(units, prefetch, resident, mode, backward_units, offload_inputs=True)
    backward = [s.unit for s in steps if isinstance(s, Compute) and s.phase is Phase.BACKWARD]
    depth = input_depth(prefetch)
    for i, step in enumerate(steps):
        if isinstance(step, FetchInput):
            following = next(s for s in steps[i:] if isinstance(s, Compute))
            assert backward.index(step.unit) - backward.index(following.unit) == depth


def test_forward_passes_and_plain_schedules_have_no_activation_steps():
    for offload, mode in ((True, "forward"), (False, "train")):
        steps = build_schedule([1, 2, 3, 4], 1, mode=mode, offload_inputs=offload)
        assert not [s for s in steps if isinstance(s, (OffloadInput, FetchInput))]


def test_offload_by_hand_with_prefetch_one():
    steps = build_schedule([1, 2, 3, 4, 5], 1, backward_units=frozenset({1, 2, 3, 4}), offload_inputs=True)
    assert [str(s) for s in steps if isinstance(s, (OffloadInput, FetchInput)) or
            (isinstance(s, Compute) and s.phase is Phase.BACKWARD)] == [
        "offload x1", "offload x2", "backward 4@1", "fetch x2", "backward 3@0", "fetch x1", "backward 2@1",
        "backward 1@0"]
