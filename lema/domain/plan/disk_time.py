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

Wiring with the general step-time model (``lema/domain/plan/timing.py``): the reads run on
the prefetch thread, overlapped with the compute, so a step takes about
``max(compute, disk_seconds, link)``; :attr:`DiskTime.seconds` is the disk term of that max.

Example:
    >>> reads = step_reads(streamed=(1, 2, 3), n_layers=2, training=True, kept_at_turn=0)
    >>> reads
    (1, 2, 3, 2, 1)
    >>> disk_bytes_per_step(reads, {1: 10, 2: 10, 3: 5}, keep=0)
    45
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import attrs

from lema.domain.units import format_size


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


@attrs.frozen
class DiskTime:
    """What the drive costs a step.

    Attributes:
        bytes_per_step: bytes read from the drive each step (steady state).
        read_rate: the drive's measured read rate, bytes/s.
        keep: the page-cache bytes LEMA keeps of the file (None: it all fits).
        rate_source: where ``read_rate`` comes from (``"measured"``, ``"cached: <path>"``).
    """

    bytes_per_step: int
    read_rate: float
    keep: int | None
    rate_source: str = "measured"

    @property
    def seconds(self) -> float:
        """Seconds per step the drive needs (a lower bound on the step when the run is disk-bound)."""
        return self.bytes_per_step / self.read_rate if self.read_rate > 0 else 0.0

    def disk_bound(self, compute_seconds: float | None) -> bool | None:
        """Whether the drive, not the compute, sets the step time (None: compute unknown)."""
        if compute_seconds is None or not self.read_rate > 0:
            return None
        return self.seconds > compute_seconds

    def line(self, compute_seconds: float | None = None) -> str:
        """One line for the plan: bytes, rate, seconds and (given the compute's time) the verdict."""
        if self.keep is None:
            return "disk: the model fits the page cache; only the first step reads the drive"
        if not self.read_rate > 0:
            return (f"disk: the model does not fit the page cache: {format_size(self.bytes_per_step)} read from the "
                    f"drive per step (its read rate not measured: {self.rate_source}); LEMA keeps "
                    f"{format_size(self.keep)} of it cached")
        bound = self.disk_bound(compute_seconds)
        verdict = ("" if bound is None else
                   f"; disk-bound (compute {compute_seconds:.2f} s)" if bound else
                   f"; compute-bound (compute {compute_seconds:.2f} s)")
        return (f"disk: the model does not fit the page cache: {format_size(self.bytes_per_step)} read from the "
                f"drive per step at {format_size(int(self.read_rate))}/s ({self.rate_source}) = at least "
                f"{self.seconds:.2f} s per step; LEMA keeps {format_size(self.keep)} of it cached{verdict}")


def disk_time(reads: Sequence[int], unit_bytes: Mapping[int, int], file_bytes: int, available: int,
              run_host_bytes: int, read_rate: float, rate_source: str = "measured", in_flight: int = 0) -> DiskTime:
    """The :class:`DiskTime` of a run: ``reads`` (:func:`step_reads`) of units of
    ``unit_bytes``, a model file of ``file_bytes``, ``available`` RAM beside a run needing
    ``run_host_bytes``, and the drive's ``read_rate`` (bytes/s; 0: not measured)."""
    keep = cache_share(available, run_host_bytes) if streams_from_disk(file_bytes, available, run_host_bytes) \
        else None
    return DiskTime(disk_bytes_per_step(reads, unit_bytes, keep, in_flight), read_rate, keep, rate_source)
