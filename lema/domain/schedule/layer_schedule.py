"""LayerSchedule: the ordered fetch / compute / release steps of one pass (pure).

The functional core of streaming (cosmicpython's ``determine_actions``): plain inputs in,
a tuple of steps out; :mod:`lema.app.runtime.engine` carries them out. Nothing here touches a file,
a device, a clock or a thread.

Vocabulary:

* *units* are spec unit indices in forward order (usually ``1..L+1``: the decoder layers,
  then the head; the embedding is gathered on the host and never streamed).
* *resident* units live on the device for the whole run: the engine uploads them once
  when it is built, and the schedule never fetches or releases them (their ``Compute``
  steps carry ``slot=None``).
* every other unit is *streamed* through ``slot_count(n_streamed, prefetch)`` slots.

Prefetch semantics: before the compute of a streamed unit, the fetches for the next
``prefetch`` streamed computes are issued (as far as that is possible without a fetch).
``prefetch=0`` is fetch-then-compute with one slot. A slot is released (free to
overwrite) right after the last compute that reads it. At the forward -> backward turn
the units still held in slots are reused by their backward compute instead of being
fetched again; when a fetch must overwrite a free slot, it picks the one whose content is
needed furthest in the future (Belady), which in the forward pass is plain ring order.

Activation offload (``offload_inputs=True``, train mode): the checkpointed input of every
unit with a backward compute leaves the device right after that unit's forward compute
(:class:`OffloadInput`) and comes back ahead of its backward compute (:class:`FetchInput`),
:func:`input_depth` backward computes early, like a weight prefetch. The inputs of the last
``input_depth + 1`` such units are needed first after the turn and are never offloaded
(:func:`kept_inputs`), as the weights still in their slots at the turn are not fetched again.

Example:
    >>> steps = build_schedule([1, 2, 3], prefetch=1)
    >>> [str(s) for s in steps[:4]]
    ['fetch 1->0', 'fetch 2->1', 'forward 1@0', 'release 1@0']
    >>> transfer_count(steps)  # 3 forward + 3 backward - 2 still in the slots at the turn
    4
"""

from __future__ import annotations

import enum
from typing import Literal, Sequence, Union

import attrs

from lema.errors import ConfigError


class Phase(str, enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


@attrs.frozen
class Fetch:
    """Read ``unit`` from the weight source and upload it into device slot ``slot``."""

    unit: int
    slot: int

    def __str__(self) -> str:
        return f"fetch {self.unit}->{self.slot}"


@attrs.frozen
class Compute:
    """Run ``unit``'s ``phase`` on the weights in ``slot`` (``None``: a resident unit)."""

    unit: int
    phase: Phase
    slot: int | None

    def __str__(self) -> str:
        return f"{self.phase.value} {self.unit}@{'resident' if self.slot is None else self.slot}"


@attrs.frozen
class Release:
    """Compute is done with ``slot`` (holding ``unit``): a later fetch may overwrite it."""

    unit: int
    slot: int

    def __str__(self) -> str:
        return f"release {self.unit}@{self.slot}"


@attrs.frozen
class OffloadInput:
    """Copy ``unit``'s checkpointed input to host memory; its device copy is then released."""

    unit: int

    def __str__(self) -> str:
        return f"offload x{self.unit}"


@attrs.frozen
class FetchInput:
    """Copy ``unit``'s checkpointed input back to the device, ahead of its backward compute."""

    unit: int

    def __str__(self) -> str:
        return f"fetch x{self.unit}"


Step = Union[Fetch, Compute, Release, OffloadInput, FetchInput]


def slot_count(n_streamed: int, prefetch: int) -> int:
    """Device slots needed to stream ``n_streamed`` units with ``prefetch`` depth."""
    if prefetch < 0:
        raise ConfigError(f"prefetch: {prefetch} must be >= 0 (0 fetches each layer just before use)")
    return min(prefetch + 1, n_streamed) if n_streamed > 0 else 0


def build_schedule(
    units: Sequence[int],
    prefetch: int,
    resident: frozenset[int] = frozenset(),
    mode: Literal["train", "forward"] = "train",
    backward_units: frozenset[int] | None = None,
    offload_inputs: bool = False,
    kept_units: frozenset[int] = frozenset(),
) -> tuple[Step, ...]:
    """The steps of one pass over ``units``.

    Args:
        units: spec unit indices in forward order (distinct).
        prefetch: how many streamed computes ahead fetches are issued (0 = serial).
        resident: units kept on the device for the whole run; never fetched here.
        mode: ``"train"`` (forward, then backward in reverse) or ``"forward"``.
        backward_units: units with a backward compute (train mode; default: all units).
        offload_inputs: add the activation steps (train mode; see the module docstring).
        kept_units: units that keep their autograd graph from the forward (the plan's kept
            activations): they have no checkpointed input, so none is offloaded; the others
            offload as if the kept ones were not there.

    Returns:
        Fetch, Compute and Release steps (and OffloadInput, FetchInput) in the order the
        engine issues them.

    Raises:
        ConfigError: negative prefetch, repeated units, an unknown mode, or backward
            units that are not among ``units``.
    """
    units = tuple(units)
    if len(set(units)) != len(units):
        raise ConfigError(f"units: {list(units)} repeats a unit; each unit is computed once per phase")
    if mode not in ("train", "forward"):
        raise ConfigError(f"mode: {mode!r} must be 'train' or 'forward'")
    if mode == "train":
        backward = frozenset(units) if backward_units is None else frozenset(backward_units)
        stray = sorted(backward - set(units))
        if stray:
            raise ConfigError(f"backward_units: {stray} are not among the units {list(units)}")
        uses = [(u, Phase.FORWARD) for u in units] + [(u, Phase.BACKWARD) for u in reversed(units) if u in backward]
    else:
        uses = [(u, Phase.FORWARD) for u in units]
    n_slots = slot_count(sum(1 for u in units if u not in resident), prefetch)
    steps = _Simulation(uses, frozenset(resident), prefetch, n_slots).run()
    if mode == "train" and offload_inputs:
        steps = _with_offload(steps, [u for u, phase in uses if phase is Phase.BACKWARD and u not in kept_units],
                              prefetch)
    return steps


def input_depth(prefetch: int) -> int:
    """How many backward computes ahead an offloaded input is fetched back: 1 (0 when
    ``prefetch`` is 0). One is enough: a layer's input is a few bytes per product its
    backward computes, so its copy hides behind the compute of the layer before."""
    return min(prefetch, 1)


def kept_inputs(n_backward: int, prefetch: int) -> int:
    """Inputs never offloaded: those of the first ``input_depth + 1`` backward computes."""
    return min(input_depth(prefetch) + 1, n_backward)


def _with_offload(steps: tuple[Step, ...], backward_order: list[int], prefetch: int) -> tuple[Step, ...]:
    depth, kept = input_depth(prefetch), kept_inputs(len(backward_order), prefetch)
    offloaded = set(backward_order[kept:])
    # FetchInput(u) goes before the backward compute `depth` positions ahead of u's own.
    fetch_before = {backward_order[p - depth]: backward_order[p] for p in range(kept, len(backward_order))}
    out: list[Step] = []
    for step in steps:
        if isinstance(step, Compute) and step.phase is Phase.BACKWARD and step.unit in fetch_before:
            out.append(FetchInput(fetch_before[step.unit]))
        out.append(step)
        if isinstance(step, Compute) and step.phase is Phase.FORWARD and step.unit in offloaded:
            out.append(OffloadInput(step.unit))
    return tuple(out)


class _Simulation:
    """Walks the uses once, deciding each streamed use's slot at the time it is issued."""

    def __init__(self, uses: list[tuple[int, Phase]], resident: frozenset[int], prefetch: int, n_slots: int):
        self.uses = uses
        self.resident = resident
        self.streamed = [i for i, (u, _) in enumerate(uses) if u not in resident]
        self.prefetch = prefetch
        self.content: list[int | None] = [None] * n_slots  # unit whose bytes the slot holds
        self.holders: list[set[int]] = [set() for _ in range(n_slots)]  # issued, uncomputed uses
        self.slot_of: dict[int, int] = {}  # use index -> slot
        self.pointer = 0  # ring position of the next fetch
        self.steps: list[Step] = []

    def _next_use(self, unit: int | None, after: int) -> float:
        for i in self.streamed:
            if i > after and self.uses[i][0] == unit:
                return i
        return float("inf")

    def _issue(self, use: int) -> None:
        unit = self.uses[use][0]
        held = [s for s, c in enumerate(self.content) if c == unit]
        if held:  # still in a slot (being computed, or released and not yet overwritten)
            slot = held[0]
        else:
            free = [s for s in range(len(self.content)) if not self.holders[s]]
            n = len(self.content)
            ring = sorted(free, key=lambda s: (s - self.pointer) % n)
            slot = max(ring, key=lambda s: (self._next_use(self.content[s], use), -ring.index(s)))
            self.pointer = (slot + 1) % n
            self.content[slot] = unit
            self.steps.append(Fetch(unit, slot))
        self.holders[slot].add(use)
        self.slot_of[use] = slot

    def run(self) -> tuple[Step, ...]:
        issued = 0  # position in self.streamed of the next use to issue
        for index, (unit, phase) in enumerate(self.uses):
            if unit in self.resident:
                self.steps.append(Compute(unit, phase, None))
                continue
            position = self.streamed.index(index)
            while issued < len(self.streamed) and issued <= position + self.prefetch:
                self._issue(self.streamed[issued])
                issued += 1
            slot = self.slot_of[index]
            self.steps.append(Compute(unit, phase, slot))
            self.holders[slot].discard(index)
            if not self.holders[slot]:
                self.steps.append(Release(unit, slot))
        return _drop_early_releases(self.steps)


def _drop_early_releases(steps: list[Step]) -> tuple[Step, ...]:
    """Keep a slot held from a compute until the last compute that reuses its content.

    The simulation frees a slot after each compute and lets a later use pick its bytes up
    again if nothing overwrote them; a Release between two computes of the same bytes is
    moved to after the last of them, so a slot is released exactly once per fetch.
    """
    out = list(steps)
    last_compute: dict[int, int] = {}  # slot -> index in out of the latest compute on it
    for i, step in enumerate(out):
        if isinstance(step, Compute) and step.slot is not None:
            prev = last_compute.get(step.slot)
            if prev is not None:
                for j in range(prev + 1, i):
                    other = out[j]
                    if isinstance(other, Release) and other.slot == step.slot:
                        out[j] = None  # type: ignore[call-overload]
                        break
            last_compute[step.slot] = i
        elif isinstance(step, Fetch):
            last_compute.pop(step.slot, None)
    return tuple(s for s in out if s is not None)


def transfer_count(schedule: Sequence[Step]) -> int:
    """Units moved host -> device by a schedule (its Fetch steps)."""
    return sum(1 for s in schedule if isinstance(s, Fetch))


def expected_transfers(units: Sequence[int], prefetch: int, resident: frozenset[int] = frozenset(),
                       mode: Literal["train", "forward"] = "train",
                       backward_units: frozenset[int] | None = None) -> int:
    """Closed form of :func:`transfer_count` (what the planner charges the link per step).

    Forward fetches every streamed unit once. Backward fetches every streamed backward
    unit again except those still held in a slot at the turn: the last ``slot_count``
    streamed units of the forward pass that have a backward compute.
    """
    streamed = [u for u in units if u not in resident]
    if mode == "forward":
        return len(streamed)
    backward = frozenset(units) if backward_units is None else backward_units
    n_slots = slot_count(len(streamed), prefetch)
    at_turn = streamed[len(streamed) - n_slots:] if n_slots else []
    kept = sum(1 for u in at_turn if u in backward)
    return len(streamed) + sum(1 for u in streamed if u in backward) - kept
