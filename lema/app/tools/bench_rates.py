"""The step-time side of ``lema bench`` (issue 27): this machine's rates, measured as ``lema plan
--calibrate`` measures them, and the adapters of every LEMA run against the first one's."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def compare_adapters(runs: list[dict[str, Any]], first: dict[str, Any] | None) -> None:
    """Replace each run's ``adapters`` (its LoRA tensors after the same steps) with
    ``adapters_max_rel_diff``: the largest relative difference to the first LEMA run's."""
    reference = None if first is None else first.pop("adapters", None)
    for r in runs:
        mine = r.pop("adapters", None)
        if reference is not None and mine is not None:
            r["adapters_max_rel_diff"] = max(
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(mine, reference))


def measure_rates(settings: Any, mono: Path, device: Any) -> Any:
    """This machine's rates at the bench's dtype and shapes, measured as ``lema plan --calibrate``
    measures them (on ``device``, the bench's own kind: a simulated link is the link), not
    cached; the device is closed."""
    from lema.adapters.devices.calibrate import calibrate, device_name
    from lema.app.tools.engine_overhead import engine_overhead
    from lema.adapters.weights.model_files import resolve_model
    from lema.domain.model.spec import dtype_code
    from lema.domain.plan.assemble import facts_for
    from lema.domain.plan.inputs import TrainingShape

    spec = resolve_model(str(mono), allow_network=False).spec
    dtype = dtype_code(settings.dtype)
    shape = TrainingShape(batch=settings.batch, seq=settings.seq, lora_rank=settings.rank, dtype=dtype)
    try:
        rates, _ = calibrate(device, device_name(device.traits), facts_for(spec, shape), dtype, settings.batch,
                             settings.seq, store=False, spec=spec, shape=shape, engine=engine_overhead)
    finally:
        device.close()
    return rates
