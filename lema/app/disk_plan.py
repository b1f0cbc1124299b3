"""What the drive costs a streamed run's step, planned without torch (``lema plan`` uses it too).

:func:`disk_for` puts together the RAM the run may use, the plan's streamed units, AUTO's host
tier (:func:`lema.domain.plan.disk_time.host_tier`) and the drive's read rate (cached per drive,
or measured on the model's own file: :mod:`lema.adapters.weights.read_rate`) into a
:class:`~lema.domain.plan.disk_time.DiskTime`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lema.domain.model.spec import ModelSpec
from lema.domain.plan import disk_time as dt
from lema.domain.plan.host_fit import host_ram_needed
from lema.domain.plan.memory_plan import MemoryPlan
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.schedule.slot_layout import unit_buffer_bytes

Rate = tuple[float, str]


def probe_file(spec: ModelSpec, weights_path: Path | None, root: Path | None) -> str | None:
    """The local model file whose drive is measured (the first shard of a folder), or None."""
    if weights_path is not None and weights_path.is_file():
        return str(weights_path)
    if root is not None and spec.files and (root / spec.files[0]).is_file():
        return str(root / spec.files[0])
    return None


def drive_rate(probe: str | None, measure: bool, refresh: bool = False) -> Rate | None:
    """``(bytes/s, source)`` of the drive holding ``probe``: the cache, else (``measure``) a
    sustained measurement of the file (``refresh``: measured even when cached); None without one."""
    from lema.adapters.weights.read_rate import cached_read_rate, cached_source, read_rate

    if probe is None:
        return None
    if measure:
        return read_rate(probe, refresh=refresh)
    cached = cached_read_rate(probe)
    return None if cached is None else (cached, cached_source(probe))


def disk_for(spec: ModelSpec, plan_: MemoryPlan, strategy: MemoryStrategy, *, in_place: bool,
             host_memory_device: bool, available: int, rate: Callable[[], Rate | None]) -> dt.DiskTime | None:
    """The :class:`DiskTime` of plan ``plan_`` of ``spec`` on a machine with ``available`` bytes
    of RAM the run may use (None for RESIDENT, which never reads the drive after loading).

    ``in_place``: the device computes on the file's pages (every unit is read from the file);
    ``host_memory_device``: the device's memory is the host's (its items count as host RAM);
    ``rate``: called only when the model does not fit beside the run.
    """
    if strategy is MemoryStrategy.RESIDENT:
        return None
    unit_bytes = {u.index: unit_buffer_bytes(u) for u in spec.units}
    # In place, "resident" units are the file's pages too: every unit is read from the file.
    streamed = tuple(u.index for u in spec.units[1:]) if in_place else tuple(plan_.streamed_units)
    file_bytes = sum(unit_bytes[u] for u in streamed)
    run_bytes = host_ram_needed(plan_, host_memory_device)
    if not dt.streams_from_disk(file_bytes, available, run_bytes):
        return dt.DiskTime(0, 0.0, None, "not needed", layers=spec.n_layers)
    kept_at_turn = 0 if in_place else max(0, plan_.slot_count - (1 if spec.n_layers + 1 in streamed else 0))
    reads = dt.step_reads(streamed, spec.n_layers, plan_.shape.training, kept_at_turn)
    got = rate()
    speed, source = got if got is not None else (0.0, "not measured")
    held: tuple[int, ...] = ()
    if strategy is MemoryStrategy.AUTO:  # AUTO holds in host RAM the units that fit, streams the rest
        held = dt.host_tier(streamed, spec.n_layers, unit_bytes, available, run_bytes,
                            ranks=plan_.shape.local_ranks)
    return dt.disk_time(reads, unit_bytes, file_bytes, available, run_bytes, speed, source,
                        in_flight=dt.IN_FLIGHT, held=held, layers=spec.n_layers)


def ram_the_run_may_use(available: int, ram_budget: int | None) -> int:
    """The RAM left on the machine, or the run's RAM budget when smaller."""
    return available if ram_budget is None else min(available, ram_budget)
