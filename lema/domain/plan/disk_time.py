"""The drive's share of a step: how many bytes of the model file a step reads from disk, and when.

A streamed run reads every streamed unit once per pass (forward, then backward in reverse).
When the model file fits the page cache, only the first step reads the drive; when it does
not, what the next read finds in the cache depends on what LEMA keeps there. LEMA keeps
at most ``keep`` bytes of the file's pages (the rest it drops behind itself, so the page
cache does not evict the rest of the machine): the least recently read units go first.
This module, pure, simulates that policy over one step's reads in order (:func:`step_reads`)
to get the bytes each step reads from the drive in the steady state
(:func:`disk_bytes_per_step`), and at a measured read rate (the adapter
:mod:`lema.adapters.weights.read_rate`) what that costs (:class:`DiskTime`).

AUTO's host tier (:func:`host_tier`): when the file does not fit the RAM the run may use,
AUTO holds the units that fit a stated share of the RAM left (:data:`HOST_TIER_SHARE`) in
host memory (pinned where the device can), read once; only the rest streams from the drive.

Wiring with the general step-time model (``lema/domain/plan/timing.py``): the reads run on
the prefetch thread, overlapped with the compute, so a step takes about
``max(compute, disk_seconds, link)``; :attr:`DiskTime.seconds` is the disk term of that max
(:func:`with_disk`).

Example:
    >>> reads = step_reads(streamed=(1, 2, 3), n_layers=2, training=True, kept_at_turn=0)
    >>> reads
    (1, 2, 3, 2, 1)
    >>> disk_bytes_per_step(reads, {1: 10, 2: 10, 3: 5}, keep=0)
    45
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Mapping, Sequence

import attrs

from lema.domain.units import format_size

if TYPE_CHECKING:
    from lema.domain.model.spec import ModelSpec
    from lema.domain.plan.memory_plan import MemoryPlan
    from lema.domain.plan.timing import StepTime

IN_FLIGHT = 4  # the most recently read units are never dropped: they are being computed on
HOST_TIER_SHARE = 0.75  # of the RAM left beside the run, AUTO's host tier may hold; the rest stays the machine's


def step_reads(streamed: Sequence[int], n_layers: int, training: bool, kept_at_turn: int = 0) -> tuple[int, ...]:
    """The units one step reads from the source, in order.

    Forward reads every streamed unit (decoders ``1..n_layers``, the head ``n_layers + 1``);
    a training step's backward reads the streamed decoders again in reverse, except the
    last ``kept_at_turn`` of them, still in their device slots at the turn (0 in place).
    """
    forward = tuple(sorted(streamed))
    if not training:
        return forward
    decoders = [u for u in forward if 1 <= u <= n_layers]
    again = decoders[:max(0, len(decoders) - kept_at_turn)]
    return forward + tuple(reversed(again))


def disk_bytes_per_step(reads: Sequence[int], unit_bytes: Mapping[int, int], keep: int | None,
                        in_flight: int = 0) -> int:
    """Bytes a step reads from the drive in the steady state (every step after the first).

    ``keep``: the bytes of the file's pages left in the page cache, the least recently read
    dropped first (None: the file fits the page cache, nothing is read again); the last
    ``in_flight`` units read are never dropped (they are being computed on).
    """
    if keep is None:
        return 0
    cached: OrderedDict[int, int] = OrderedDict()
    missed = 0
    for step in range(2):  # the first step fills the cache; the second is the steady state
        missed = 0
        for u in reads:
            size = unit_bytes[u]
            if u in cached:
                cached.move_to_end(u)
            else:
                missed += size
                cached[u] = size
            while len(cached) > in_flight and sum(cached.values()) > keep:
                cached.popitem(last=False)
    return missed


def cache_share(available: int, run_host_bytes: int) -> int:
    """The page cache LEMA may keep of the model file: half of the RAM left once the run's
    own memory is allocated (the other half stays the machine's)."""
    return max(0, available - run_host_bytes) // 2


def streams_from_disk(file_bytes: int, available: int, run_host_bytes: int) -> bool:
    """Whether the streamed bytes do not fit the RAM left beside the run: the page cache
    cannot hold the model between steps, and every step reads (part of) it from the drive."""
    return file_bytes > max(0, available - run_host_bytes)


def host_tier(streamed: Sequence[int], n_layers: int, unit_bytes: Mapping[int, int], available: int,
              run_host_bytes: int, share: float = HOST_TIER_SHARE, ranks: int = 1) -> tuple[int, ...]:
    """The streamed units AUTO holds in host RAM: the first decoders (then the head) that fit
    ``share`` of the RAM left beside the run (``run_host_bytes``: all ``ranks`` local ranks',
    each of which holds its own copy). The first decoders, because the page cache LEMA keeps
    holds the last ones read forward, which backward reads first; a decoder held saves two
    reads per training step (forward and backward), the head one."""
    room = int(max(0, available - run_host_bytes) * share) // max(1, ranks)
    decoders = [u for u in sorted(streamed) if 1 <= u <= n_layers]
    held, used = [], 0
    for u in decoders:
        if used + unit_bytes[u] > room:
            break
        held.append(u)
        used += unit_bytes[u]
    for u in sorted(streamed):
        if u > n_layers and len(held) == len(decoders) and used + unit_bytes[u] <= room:
            held.append(u)
            used += unit_bytes[u]
    return tuple(held)


@attrs.frozen
class DiskTime:
    """What the drive costs a step.

    Attributes:
        bytes_per_step: bytes read from the drive each step (steady state).
        read_rate: the drive's measured read rate, bytes/s.
        keep: the page-cache bytes LEMA keeps of the file (None: it all fits).
        rate_source: where ``read_rate`` comes from (``"measured"``, ``"cached: <path>"``).
        held: the units AUTO holds in host RAM (never read from the drive again).
        held_bytes: their bytes.
        streamed: how many units stream from the drive (the rest of the file's).
        layers: the model's decoder layers (for the line).
    """

    bytes_per_step: int
    read_rate: float
    keep: int | None
    rate_source: str = "measured"
    held: tuple[int, ...] = ()
    held_bytes: int = 0
    streamed: int = 0
    layers: int = 0

    @property
    def seconds(self) -> float:
        """Seconds per step the drive needs (a lower bound on the step when the run is disk-bound)."""
        return self.bytes_per_step / self.read_rate if self.read_rate > 0 else 0.0

    def disk_bound(self, compute_seconds: float | None) -> bool | None:
        """Whether the drive, not the compute, sets the step time (None: compute unknown)."""
        if compute_seconds is None or not self.read_rate > 0:
            return None
        return self.seconds > compute_seconds

    def tier_text(self) -> str:
        """``holds 20 of 48 layers in host RAM (12.1 GiB); streams 28 from disk`` (AUTO's host tier), or ``""``."""
        if not self.held:
            return ""
        layers = sum(1 for u in self.held if 1 <= u <= self.layers)
        head = " and the head" if any(u > self.layers for u in self.held) else ""
        return (f"holds {layers} of {self.layers} layers{head} in host RAM ({format_size(self.held_bytes)}); "
                f"streams {self.streamed} unit{'s' if self.streamed != 1 else ''} from disk")

    def with_rate(self, rate: float, source: str) -> "DiskTime":
        """The same reads at another read rate (the one a run saw)."""
        return attrs.evolve(self, read_rate=rate, rate_source=source)

    def line(self, compute_seconds: float | None = None) -> str:
        """One line for the plan: bytes, rate, seconds and (given the compute's time) the verdict."""
        if self.keep is None:
            return "disk: the model fits the page cache; only the first step reads the drive"
        if self.held:
            return f"disk: AUTO {self.tier_text()}: " + self._reads(compute_seconds)
        return "disk: the model does not fit the page cache: " + self._reads(compute_seconds)

    def _reads(self, compute_seconds: float | None) -> str:
        kept = format_size(self.keep or 0)
        read = format_size(self.bytes_per_step)
        if not self.read_rate > 0:
            return (f"{read} read from the drive per step (its read rate not measured: {self.rate_source}); "
                    f"LEMA keeps {kept} of it cached")
        bound = self.disk_bound(compute_seconds)
        verdict = ("" if bound is None else
                   f"; disk-bound (compute {compute_seconds:.2f} s)" if bound else
                   f"; compute-bound (compute {compute_seconds:.2f} s)")
        return (f"{read} read from the drive per step at {format_size(int(self.read_rate))}/s ({self.rate_source}) "
                f"= at least {self.seconds:.2f} s per step; LEMA keeps {kept} of it cached{verdict}")


def disk_time(reads: Sequence[int], unit_bytes: Mapping[int, int], file_bytes: int, available: int,
              run_host_bytes: int, read_rate: float, rate_source: str = "measured", in_flight: int = 0,
              held: Sequence[int] = (), layers: int = 0) -> DiskTime:
    """The :class:`DiskTime` of a run: ``reads`` (:func:`step_reads`) of units of
    ``unit_bytes``, a model file of ``file_bytes``, ``available`` RAM beside a run needing
    ``run_host_bytes``, and the drive's ``read_rate`` (bytes/s; 0: not measured); ``held``:
    the units AUTO's host tier holds in RAM (:func:`host_tier`), never read again, their
    bytes no longer the page cache's."""
    held = tuple(held)
    held_bytes = sum(unit_bytes[u] for u in held)
    if not streams_from_disk(file_bytes, available, run_host_bytes):
        return DiskTime(0, read_rate, None, rate_source, layers=layers)
    keep = cache_share(available - held_bytes, run_host_bytes)
    rest = tuple(u for u in reads if u not in held)
    return DiskTime(disk_bytes_per_step(rest, unit_bytes, keep, in_flight), read_rate, keep, rate_source, held,
                    held_bytes, len(set(rest)), layers)


def with_disk(step: "StepTime", disk: DiskTime | None, plan: "MemoryPlan | None" = None,
              spec: "ModelSpec | None" = None) -> "StepTime":
    """The predicted step with the drive's term.

    On a device that computes on the host's cores (the CPU, given the ``plan``), the reads and
    the compute take turns on them: the step is the drive's seconds plus the step without it.
    Elsewhere the reads run on the prefetch thread, overlapped with the compute, so the step
    takes at least :attr:`DiskTime.seconds`. Given the ``plan`` and ``spec`` the step was predicted for
    (and weights fetched through slots), the schedule is played again with each fetch taking
    its share of the drive's time (the fetches' bytes at ``moved / disk.seconds``): a compute
    that waits on a slot still being read shows, not only the longer of the two. The bound is
    ``"disk"`` when the drive is busy longest.
    """
    if disk is None or disk.keep is None or not disk.read_rate > 0 or disk.seconds <= 0:
        return step
    if plan is not None and not plan.shape.device.async_compute:
        # A device that computes on the host's cores (the CPU): the reads (page faults, copies
        # out of the page cache) take the cores the compute runs on, so they add up rather than
        # overlap. Measured on a 2-core guest streaming a 31 GiB file (docs/benchmarks.md 15):
        # reads took 17.0 s of a 23.4 s step whose compute alone is predicted at 4.4 s.
        total = disk.seconds + step.step_seconds
        tokens = step.tokens_per_second * step.step_seconds / total
        return attrs.evolve(step, step_seconds=total, disk_seconds=disk.seconds, bound="disk",
                            share=disk.seconds / total, tokens_per_second=tokens)
    played = step
    if plan is not None and spec is not None and step.moved_bytes > 0:
        from lema.domain.plan.timing import predict

        effective = step.moved_bytes / disk.seconds
        played = predict(plan, spec, attrs.evolve(step.rates, disk_read_bytes_per_s=effective))
        played = attrs.evolve(played, rates=step.rates)
    total = max(played.step_seconds, disk.seconds)
    busy = max(step.compute_seconds, step.link_seconds)
    disk_bound = disk.seconds > busy
    bound = "disk" if disk_bound else step.bound
    share = (disk.seconds / total if disk_bound else step.share * step.step_seconds / total) if total > 0 else 0.0
    tokens = step.tokens_per_second * step.step_seconds / total if total > 0 else 0.0
    return attrs.evolve(step, step_seconds=total, disk_seconds=disk.seconds, bound=bound, share=min(1.0, share),
                        tokens_per_second=tokens)
