"""The engine's own fixed costs, for the step-time model's calibration (issue 27).

A no-op training pass of the engine over a toy of the model's own family (the calibration's
:func:`~lema.adapters.devices.calibrate.shrunk_spec`, random weights in RAM) does everything
a real pass does but compute: the schedule, the prefetch thread's reads into the slots, the
uploads, the waits, slot releases and the report. Timed with 1 and with 5 decoder layers,
the difference over the 8 compute steps more (a forward and a backward per layer) is the
cost per compute step (:attr:`~lema.domain.plan.timing.MachineRates.unit_overhead_s`); what
the 1-layer pass takes beyond its 3 steps is the pass's own start and finish (added to
``step_overhead_s``). The toy's reads and copies are a few KiB, so their bytes cost nothing.
"""

from __future__ import annotations

import time

import torch

from lema.adapters.devices.calibration_runs import shrunk_spec
from lema.adapters.weights.resident_source import ResidentSource
from lema.app.runtime.engine import Engine
from lema.domain.model.spec import ModelSpec, torch_dtype
from lema.domain.plan.inputs import TrainingShape
from lema.ports.device import Device

__all__ = ["engine_overhead"]

SMALL, LARGE = 1, 5  # decoder layers of the two toys


def _steps(layers: int) -> int:
    """Compute steps of a training pass: a forward and a backward per layer, and the head."""
    return 2 * layers + 1


def _pass_seconds(spec: ModelSpec, prefetch: int, device: Device, budget_s: float = 0.4, runs: int = 7) -> float:
    """The fastest of at least ``runs`` no-op training passes of the engine over ``spec`` on
    random weights (a fixed cost is a floor: a pass that waited for a busy core says nothing)."""
    generator = torch.Generator().manual_seed(0)
    dtype = torch_dtype(spec.dtype)
    state = {t.name: torch.randn(t.shape, generator=generator).to(dtype) for u in spec.units for t in u.tensors}
    source = ResidentSource.from_state_dict(spec, state)
    n = spec.n_layers
    backward = frozenset(range(1, n + 1))
    times: list[float] = []
    with Engine(spec, source, device, prefetch=prefetch) as engine:
        engine.run(lambda phase, unit, weights: None, mode="train", backward_units=backward)  # warm-up
        spent = 0.0
        while len(times) < runs or (spent < budget_s and len(times) < 200):
            start = time.perf_counter()
            engine.run(lambda phase, unit, weights: None, mode="train", backward_units=backward)
            device.synchronize()
            times.append(time.perf_counter() - start)
            spent += times[-1]
    source.close()
    return min(times)


def engine_overhead(spec: ModelSpec, shape: TrainingShape, device: Device) -> tuple[float, float] | None:
    """``(seconds per compute step, seconds per pass)`` of the engine on ``device`` at the run's
    prefetch depth (see the module docstring); None when the model cannot be shrunk."""
    small, large = shrunk_spec(spec, SMALL), shrunk_spec(spec, LARGE)
    if small is None or large is None or small.units[1].packed:
        return None
    t_small = _pass_seconds(small, shape.prefetch, device)
    t_large = _pass_seconds(large, shape.prefetch, device)
    per_step = max(t_large - t_small, 0.0) / (_steps(LARGE) - _steps(SMALL))
    return per_step, max(t_small - _steps(SMALL) * per_step, 0.0)
