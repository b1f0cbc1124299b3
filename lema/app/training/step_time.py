"""What a training progress line shows besides the loss: the device peak, and the predicted step
beside the measured one (issue 27)."""

from __future__ import annotations

from typing import Any


def predicted_step_seconds(model: Any, grad_accum: int = 1) -> float | None:
    """The plan's predicted optimizer step (:mod:`lema.domain.plan.timing`, at this machine's
    cached calibration or the device kind's defaults), or None for a model without a plan."""
    plan = getattr(model, "plan", None)
    spec = getattr(model, "spec", None)
    if not callable(plan) or spec is None:
        return None
    from lema.adapters.devices.calibration_cache import rates_for
    from lema.domain.plan.timing import predict

    p = plan()
    return predict(p, spec, rates_for(spec, p.shape)).step_seconds * grad_accum


def warm_prediction(predicted: float | None, step: int, first: int) -> dict[str, float]:
    """``{"predicted_seconds": ...}`` for a training record once the run has warmed up (from its
    second step: the first pays one-off costs), else ``{}``."""
    return {"predicted_seconds": predicted} if predicted is not None and step > first + 1 else {}


def time_text(record: dict[str, Any], prefix: str = "") -> str:
    """``step 1.21 s (predicted 1.15 s)`` (after ``prefix``) once warmed up, else ``""``."""
    predicted = record.get("predicted_seconds")
    return f"{prefix}step {record['seconds']:.3g} s (predicted {predicted:.3g} s)" \
        if predicted and record.get("seconds") else ""


def peak_text(record: dict[str, Any]) -> str:
    """The device peak of a metrics record, saying when the compute's allocations are not in it."""
    from lema.domain.units import format_size

    held = "" if record.get("device_peak_counts_compute", True) else " held (compute not counted)"
    return f"{format_size(record['device_peak_bytes'])}{held}"
