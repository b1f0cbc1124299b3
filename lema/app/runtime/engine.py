"""The imperative shell: carry out a :mod:`lema.domain.schedule.layer_schedule` through the ports.

The engine owns the streaming memory: ``slot_count`` device slots and as many host
staging buffers, each :func:`~lema.domain.schedule.slot_layout.slot_bytes` long, allocated once when
the engine is built, plus one device buffer per resident unit (uploaded once). A pass
(:meth:`Engine.run`) walks the schedule on the calling thread:

* ``Fetch``: hand the unit to the prefetch thread, which reads it from the weight source
  into the slot's staging buffer and starts the device upload (after the slot's previous
  reader finished: the device's consumed ticket). A source that holds the unit in
  page-locked memory (RESIDENT on CUDA: :meth:`WeightSource.host_unit`) is uploaded from
  directly: no read, no staging copy. On the CPU the unit is read straight into the slot,
  or (``traits.in_place``: no budget) not copied at all (:mod:`lema.app.runtime.ready_units`);
* ``Compute``: wait for the unit's upload, call ``compute(phase, unit, weights)`` with
  typed views of the slot (or the resident tensors);
* ``Release``: mark the slot consumed, so the next fetch into it may overwrite it;
* ``OffloadInput`` / ``FetchInput`` (engines built with ``offload_inputs=True``): move a
  checkpointed layer input to host memory and back (:mod:`lema.app.runtime.offload`).

The schedule already orders every fetch after its slot's release, so the prefetch thread
never waits for the main thread; it only waits for the device (staging reuse).

Example:
    >>> with Engine(spec, source, CpuDevice(), prefetch=1) as engine:       # doctest: +SKIP
    ...     report = engine.run(lambda phase, unit, weights: None, mode="forward")
"""

from __future__ import annotations

import queue
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

from lema.adapters.workers import start_worker, stop_worker
from lema.app.runtime.offload import InputOffloader, InputStore
from lema.app.runtime.ready_units import DONE, touched
from lema.app.runtime.step_report import StepReport
from lema.domain.model.spec import ModelSpec
from lema.domain.schedule.layer_schedule import (
    Compute,
    Fetch,
    FetchInput,
    OffloadInput,
    Phase,
    Release,
    build_schedule,
    slot_count,
)
from lema.domain.schedule.slot_layout import slot_bytes, unit_buffer_bytes, unit_layout, unit_views
from lema.domain.units import format_size
from lema.errors import ConfigError, DoesNotFitError
from lema.ports.device import Device, Ticket
from lema.ports.weights import WeightSource

ComputeFn = Callable[[Phase, int, Mapping[str, torch.Tensor]], None]


class Engine:
    """Streams a model's units through a device for compute callbacks.

    Args:
        spec: the model.
        source: where the weights come from.
        device: where they go.
        prefetch: streamed units fetched ahead of the one computing (0: serial).
        resident_units: units uploaded once and kept on the device.
        streamed_units: units streamed per pass (default: ``units[1:]`` minus the resident).
        plan: optional memory plan (``.device_total`` bytes, ``.fits``, ``.kept_units``: never
            offloaded); the engine refuses to start, before allocating anything, if it does not fit.
        compute_dtype: the dtype quantized weights are dequantized to (default: the spec's);
            a model with packed weights gets one device scratch buffer for them
            (:class:`lema.adapters.devices.dequantize.UnitDequantizer`).
        offload_inputs: train passes move the checkpointed layer inputs to host memory and
            back (the schedule's activation steps); :meth:`run` then needs ``inputs``.

    Raises:
        ConfigError: negative prefetch, or a unit both resident and streamed / unknown.
        DoesNotFitError: ``plan`` does not fit (or exceeds ``device.capacity``).
        DeviceOutOfMemory: slots or resident units exceed the device's capacity.
    """

    def __init__(self, spec: ModelSpec, source: WeightSource, device: Device, *, prefetch: int,
                 resident_units: Sequence[int] = (), streamed_units: Sequence[int] | None = None,
                 plan: Any = None, compute_dtype: torch.dtype | None = None, offload_inputs: bool = False) -> None:
        resident = tuple(resident_units)
        if streamed_units is None:
            streamed_units = [u.index for u in spec.units[1:] if u.index not in resident]
        streamed = tuple(streamed_units)
        known = range(len(spec.units))
        bad = sorted({u for u in resident + streamed if u not in known} | (set(resident) & set(streamed)))
        if bad:
            raise ConfigError(f"units {bad} are unknown or both resident and streamed "
                              f"(units are 0..{len(spec.units) - 1})")
        _check_plan(plan, device)
        self.spec, self.source, self.device = spec, source, device
        self.prefetch = prefetch
        self.offload_inputs, self.kept_units = bool(offload_inputs), frozenset(getattr(plan, "kept_units", ()))
        self.n_slots = slot_count(len(streamed), prefetch)  # validates prefetch
        self.units = tuple(sorted(resident + streamed))
        self.resident = frozenset(resident)
        self.slot_nbytes = slot_bytes([spec.units[i] for i in streamed])
        self._layouts = {i: unit_layout(spec.units[i]) for i in self.units}
        self._sizes = {i: unit_buffer_bytes(spec.units[i]) for i in self.units}
        self._owned: list[torch.Tensor] = []
        self._closed = False
        self.bytes_uploaded_total = 0
        self._dequant: Any = None  # the UnitDequantizer of a quantized model (see :attr:`dequantizer`)
        self._fetched = [0] * self.n_slots  # fetches into each slot: what its bytes are (dequantization)
        packed = any(spec.units[i].packed for i in self.units)
        self._in_place = device.traits.in_place and not packed
        self._placed: list[Mapping[str, torch.Tensor] | None] = [None] * self.n_slots
        try:
            self._slots = [] if self._in_place else [self._alloc(self.slot_nbytes, f"slot {k}")
                                                     for k in range(self.n_slots)]
            # A device whose memory is host memory (the CPU) is read into directly: no staging
            # copy, no second pass over the bytes competing with compute for the cores.
            self._direct = device.traits.direct_reads or self._in_place
            # A source holding every streamed unit page-locked (pinned RESIDENT) is uploaded
            # from directly: no staging ring to allocate (or pin).
            staged = not self._direct and any(source.host_unit(u) is None for u in streamed)
            # A spare one (GPU): the read of the next unit never waits for an upload in flight.
            n_staging = self.n_slots + device.traits.spare_staging
            self._staging = [device.host_buffer(self.slot_nbytes) for _ in range(n_staging)] if staged else []
            self._resident = self._load_resident(sorted(resident))
            if packed:
                self._dequant = _dequantizer(spec, source, device, compute_dtype, self.units)
        except BaseException:
            self._free_all()
            raise
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._consumed: list[Ticket | None] = [None] * self.n_slots  # stays None in place
        self._staged: list[Ticket | None] = [None] * len(self._staging)  # each staging buffer's last upload
        self._next_staging = 0  # the staging buffer the next read takes (prefetch thread only)
        self._inputs = InputOffloader(device)
        self._jobs: queue.Queue = queue.Queue()
        # The thread holds only a weak reference, so an engine nobody closed is still
        # collected, and its finalizer stops the thread.
        self._thread = start_worker(self, self._jobs, Engine._prefetch_one, "lema-prefetch")
        weakref.finalize(self, stop_worker, self._jobs, self._thread)

    # -- construction --------------------------------------------------------------------------

    def _alloc(self, nbytes: int, label: str) -> torch.Tensor:
        tensor = self.device.alloc(nbytes, label)
        self._owned.append(tensor)
        return tensor

    def _load_resident(self, units: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        out: dict[int, dict[str, torch.Tensor]] = {}
        if not units:
            return out
        staging = None  # made on first need: a unit with no page-locked copy, on a device with its own memory
        for u in units:
            if self._in_place:
                out[u] = touched(self.source.read_unit(u))
                continue
            buffer = self._alloc(self._sizes[u], f"resident {self.spec.units[u].name}")
            host = None if self._direct else self.source.host_unit(u)
            if host is not None:
                ticket = self.device.upload(host, buffer, self._sizes[u], label=u)
                ticket.wait()
                self.bytes_uploaded_total += self._sizes[u]
                out[u] = unit_views(buffer, self._layouts[u])
                continue
            if self._direct:
                self.source.read_unit(u, buffer)
                self.bytes_uploaded_total += self._sizes[u]
                out[u] = unit_views(buffer, self._layouts[u])
                continue
            if staging is None:
                need = max(self._sizes[v] for v in units)
                staging = (self._staging[0] if self._staging and need <= self.slot_nbytes
                           else self.device.host_buffer(need))
            self.source.read_unit(u, staging)
            ticket = self.device.upload(staging, buffer, self._sizes[u], label=u)
            self.device.host_reusable(ticket)
            ticket.wait()
            self.bytes_uploaded_total += self._sizes[u]
            out[u] = unit_views(buffer, self._layouts[u])
        return out

    # -- the prefetch thread -------------------------------------------------------------------

    def _prefetch_one(self, job: tuple) -> None:
        unit, slot, after, future = job
        try:
            if self._in_place:
                self.device.record("read_start", unit)
                self._placed[slot] = touched(self.source.read_unit(unit))  # pages faulted in here, ahead
                self.device.record("read_done", unit)
                future.set_result(DONE)
                return
            if self._direct:
                if after is not None:
                    after.wait()
                self.device.record("read_start", unit)
                self.source.read_unit(unit, self._slots[slot])
                self.device.record("read_done", unit)
                link = self.device.traits.simulated_link  # its time passes, no copy
                if not link:
                    self.device.record("upload_done", unit)
                future.set_result(self.device.carry(self._sizes[unit], label=unit) if link else DONE)
                return
            host = self.source.host_unit(unit)
            if host is not None:
                # Page-locked already: DMA straight from the source's copy, no staging.
                future.set_result(self.device.upload(host, self._slots[slot], self._sizes[unit], after=after,
                                                     label=unit))
                return
            k, self._next_staging = self._next_staging, (self._next_staging + 1) % len(self._staging)  # in turn
            if (previous := self._staged[k]) is not None:
                self.device.host_reusable(previous)
            self.device.record("read_start", unit)
            self.source.read_unit(unit, self._staging[k])
            self.device.record("read_done", unit)
            ticket = self.device.upload(self._staging[k], self._slots[slot], self._sizes[unit],
                                        after=after, label=unit)
            self._staged[k] = ticket
            future.set_result(ticket)
        except BaseException as exc:  # re-raised on the main thread by future.result()
            future.set_exception(exc)

    # -- a pass --------------------------------------------------------------------------------

    def run(self, compute: ComputeFn, *, mode: Literal["train", "forward"] = "train",
            backward_units: frozenset[int] | Sequence[int] | None = None,
            inputs: InputStore | None = None) -> StepReport:
        """Walk one pass's schedule, calling ``compute(phase, unit, weights)`` for each compute step.

        Args:
            compute: receives typed device tensors keyed by :attr:`TensorSpec.key`; they are
                valid only during the call (the slot is refilled afterwards).
            mode: ``"train"`` (forward, then backward in reverse) or ``"forward"``.
            backward_units: units with a backward compute in train mode (default: all).
            inputs: the pass's checkpointed inputs (needed by an engine that offloads them).

        Returns:
            A :class:`StepReport`.

        Raises:
            whatever ``compute`` or the weight source raised (reads fail on the prefetch
            thread and are re-raised here); ConfigError when the engine is closed, or when it
            offloads inputs and a train pass gives none.
        """
        if self._closed:
            raise ConfigError("the engine is closed")
        offload = self.offload_inputs and mode == "train"
        if offload and inputs is None:
            raise ConfigError("this engine offloads activations: a train pass must pass inputs= (its InputStore)")
        backward = None if backward_units is None else frozenset(backward_units)
        steps = build_schedule(self.units, self.prefetch, self.resident, mode, backward, offload, self.kept_units)
        device = self.device
        device.reset_peak()
        start = time.perf_counter()
        pending: dict[int, Future] = {}
        issued: list[Future] = []
        stats = {"wait": device.stopwatch(), "compute": device.stopwatch(), "moved": 0, "fetches": 0, "offloaded": 0}
        read_before = self.source.bytes_copied
        try:
            with device.measuring():  # the compute's own allocations count toward the device peak
                self._walk(steps, compute, pending, issued, stats, inputs)
        except BaseException:
            # A failed compute may still be reading any slot (on CUDA, asynchronously).
            if not self._in_place:
                self._consumed = [device.mark_consumed(slot) for slot in self._slots]
            raise
        finally:
            # Let every read this pass started finish, so none writes a slot or staging
            # buffer behind the next pass's back (errors were or will be raised above).
            for future in issued:
                future.exception()
            self._inputs.drop()
        self.bytes_uploaded_total += stats["moved"]
        bandwidth = device.link_bandwidth
        return StepReport(
            bytes_uploaded=stats["moved"], n_fetches=stats["fetches"], wait_seconds=stats["wait"].seconds(),
            compute_seconds=stats["compute"].seconds(),  # the device's time (events on a GPU)
            seconds=time.perf_counter() - start, device_peak_bytes=device.peak_bytes(),
            bytes_read=self.source.bytes_copied - read_before,
            link_floor_seconds=(stats["moved"] + 2 * stats["offloaded"]) / bandwidth if bandwidth else None,
            peak_counts_compute=device.traits.counts_compute,
            timeline=tuple(e for e in device.timeline() if isinstance(e[-1], float) and e[-1] >= start),
            activation_bytes=stats["offloaded"],
        )

    def _walk(self, steps, compute: ComputeFn, pending: dict[int, Future], issued: list[Future],
              stats: dict[str, Any], inputs: InputStore | None) -> None:
        device = self.device
        for step in steps:
            if isinstance(step, OffloadInput):
                stats["offloaded"] += self._inputs.offload(step.unit, inputs)  # type: ignore[arg-type]
            elif isinstance(step, FetchInput):
                self._inputs.fetch(step.unit)
            elif isinstance(step, Fetch):
                future: Future = Future()
                pending[step.slot] = future
                issued.append(future)
                device.record("fetch_issued", step.unit, step.slot)
                self._jobs.put((step.unit, step.slot, self._consumed[step.slot], future))
                self._fetched[step.slot] += 1
                stats["fetches"] += 1
                stats["moved"] += 0 if self._in_place else self._sizes[step.unit]
            elif isinstance(step, Compute):
                if step.slot is None:
                    weights = self._resident[step.unit]
                else:
                    stats["wait"].start()
                    pending[step.slot].result().wait()
                    stats["wait"].stop()
                    weights = self._placed[step.slot] if self._in_place else self._slot_views(step.unit, step.slot)
                if self._dequant is not None:
                    fetch = None if step.slot is None else self._fetched[step.slot]
                    weights = self._dequant(step.unit, weights, (step.unit, step.slot, fetch))
                stats["wait"].start()  # an offloaded input comes back before its backward
                restored = self._inputs.hand_back(step.unit, inputs) if step.phase is Phase.BACKWARD else None
                stats["wait"].stop()
                device.record("compute_start", step.unit, step.phase.value)
                stats["compute"].start()
                compute(step.phase, step.unit, weights)
                stats["compute"].stop()
                device.record("compute_end", step.unit, step.phase.value)
                self._inputs.release(restored)
                del restored  # on CUDA the memory goes back to the allocator only with the last reference
            elif isinstance(step, Release):
                if self._in_place:
                    self._placed[step.slot] = None
                else:
                    self._consumed[step.slot] = device.mark_consumed(self._slots[step.slot])
                device.record("release", step.unit, step.slot)

    @property
    def dequantizer(self) -> Any:
        """The device-side dequantization of a quantized model (``.dequantized`` units,
        ``.seconds`` spent, ``.nbytes`` of scratch), or None for a dense model."""
        return self._dequant

    def _slot_views(self, unit: int, slot: int) -> dict[str, torch.Tensor]:
        key = (unit, slot)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = unit_views(self._slots[slot], self._layouts[unit])
        return views

    # -- lifetime --------------------------------------------------------------------------------

    def _free_all(self) -> None:
        if self._dequant is not None:
            self._dequant.close()
        for tensor in self._owned:
            self.device.free(tensor)
        self._owned.clear()

    def close(self) -> None:
        """Stop the prefetch thread and give the slots and resident units back to the device."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join()
        self.device.synchronize()
        self._views.clear()
        self._resident.clear()
        self._inputs.close()
        self._free_all()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dequantizer(spec: ModelSpec, source: WeightSource, device: Device, dtype: torch.dtype | None,
                 units: Sequence[int]) -> Any:
    """The device-side dequantization of a model with packed weights (imports bitsandbytes)."""
    from lema.adapters.devices.dequantize import UnitDequantizer
    from lema.adapters.weights.bnb import read_quant_states
    from lema.domain.model.spec import torch_dtype

    compute = dtype if dtype is not None else torch_dtype(spec.dtype)
    return UnitDequantizer(spec, device, compute, read_quant_states(spec, source), units)


def _check_plan(plan: Any, device: Device) -> None:
    if plan is None:
        return
    total = int(getattr(plan, "device_total"))
    capacity = device.capacity
    if capacity is not None and total > capacity:
        raise DoesNotFitError(
            f"the memory plan needs {format_size(total)} ({total} bytes) on the device but its capacity is "
            f"{format_size(capacity)} ({capacity} bytes); lower batch_size, max_seq_len or "
            "prefetch_distance, or use a larger device", plan)
    if not getattr(plan, "fits", True):
        explain = getattr(plan, "explain", None)
        raise DoesNotFitError(explain() if callable(explain) else "the memory plan does not fit the device", plan)
