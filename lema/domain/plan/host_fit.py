"""Does a plan's host memory fit the RAM the machine has left? Checked before anything loads.

RESIDENT holds every weight in RAM; a model larger than the RAM left would be killed by the
system part-way through loading (or swap the machine to a halt). :func:`host_ram_needed`
is what the plan says the host must hold: its host items, plus its device items when the
device's memory is the host's (the CPU); :func:`host_shortfall` is the one line refusing a
run whose need exceeds what is available.
"""

from __future__ import annotations

from lema.domain.plan.memory_plan import MemoryPlan
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.units import format_size


def host_ram_needed(plan: MemoryPlan, device_is_host: bool) -> int:
    """Bytes of host RAM the run allocates: its host items (and device items on the CPU)."""
    return plan.host_total + (plan.device_total if device_is_host else 0)


def host_shortfall(plan: MemoryPlan, device_is_host: bool, available: int, where: str) -> str | None:
    """One line refusing the run when it needs more host RAM than ``available``; else None.

    ``where`` says where ``available`` comes from (``"MemAvailable in /proc/meminfo"``,
    ``"--ram"``).
    """
    need = host_ram_needed(plan, device_is_host)
    if need <= available:
        return None
    weights = sum(i.bytes for i in plan.host_items if i.name in ("resident_weights_host", "embedding"))
    strategy = plan.shape.strategy
    if strategy is MemoryStrategy.RESIDENT:
        fix = ("use strategy STREAMING (--strategy streaming): it reads the weights from the file every step "
               "and needs no RAM per model byte")
    else:
        fix = "free host memory, or lower the batch, the sequence length or the prefetch distance"
    held = f" ({format_size(weights)} of it weights held in RAM)" if weights else ""
    return (f"{strategy.value.upper()} needs {format_size(need)} of host RAM{held}, but this machine has "
            f"{format_size(available)} available ({where}); {fix}")
