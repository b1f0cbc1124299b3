"""What a training progress line shows besides the loss: the device peak, and the predicted step
beside the measured one (issue 27)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def predicted_step_seconds(model: Any, grad_accum: int = 1) -> float | None:
    """The plan's predicted optimizer step (:mod:`lema.domain.plan.timing`, at this machine's
    cached calibration or the device kind's defaults), or None for a model without a plan."""
    from lema.domain.plan.disk_time import with_disk

    step = _planned_step(model)
    if step is None:
        return None
    return with_disk(step, getattr(model, "disk", None), model.plan(), model.spec).step_seconds * grad_accum


def _planned_step(model: Any) -> Any:
    """The plan's :class:`~lema.domain.plan.timing.StepTime` without the drive, or None."""
    plan = getattr(model, "plan", None)
    spec = getattr(model, "spec", None)
    if not callable(plan) or spec is None:
        return None
    from lema.adapters.devices.calibration_cache import rates_for
    from lema.domain.plan.timing import predict

    p = plan()
    return predict(p, spec, rates_for(spec, p.shape))


class DiskFeedback:
    """The read rate a run from the drive actually sees, fed back into the prediction.

    A model that does not fit the page cache reads the drive every step. The plan's read rate
    is a calibration (:mod:`lema.adapters.weights.read_rate`); once the run has done its first
    full step from disk, the rate that step saw replaces it: for the progress line's
    "predicted" value from then on, and in the per-drive cache, so the next plan uses it.

    The rate seen: the bytes the process read from storage during the step (``/proc/self/io``;
    else the bytes asked of the file) over the seconds the source spent reading units into
    buffers (the slot path: the reads alone). In place, the reads are page faults inside the
    compute and cannot be timed apart from it: the step's wall time stands for them, which
    is the drive's rate only when the step is disk-bound; so in place the rate is used and
    cached only when the plan predicted the step disk-bound.
    """

    def __init__(self, model: Any, grad_accum: int = 1) -> None:
        disk = getattr(model, "disk", None)
        self.active = disk is not None and disk.keep is not None
        self.model, self.grad_accum, self.disk = model, grad_accum, disk
        self.rate: float | None = None
        self._start: tuple[int | None, int, float] | None = None

    def _file(self) -> str | None:
        """The model file (first shard) the source streams from, whose drive the rate is cached for."""
        source = getattr(self.model, "source", None)
        stream = getattr(source, "stream", source)
        root, spec = getattr(stream, "root", None), getattr(self.model, "spec", None)
        if root is None or spec is None or not spec.files:
            return None
        path = Path(root) / spec.files[0]
        return str(path) if path.is_file() else None

    def _counters(self) -> tuple[int | None, int, float]:
        from lema.adapters.weights.read_rate import process_read_bytes

        source = getattr(self.model, "source", None)
        asked = int(getattr(source, "bytes_streamed", None) or getattr(source, "bytes_copied", 0) or 0)
        return process_read_bytes(), asked, float(getattr(source, "read_seconds", 0.0) or 0.0)

    def begin(self) -> None:
        """Before a step: the counters' values."""
        if self.active and self.rate is None:
            self._start = self._counters()

    def after(self, seconds: float, predicted: float | None) -> float | None:
        """After a step of ``seconds``: the prediction to show from now on (the same until the
        first step from disk has been measured)."""
        if self._start is None or self.rate is not None or self.disk is None:
            return predicted
        (drive0, asked0, timed0), (drive1, asked1, timed1) = self._start, self._counters()
        self._start = None
        nbytes = drive1 - drive0 if drive0 is not None and drive1 is not None and drive1 > drive0 else asked1 - asked0
        timed = timed1 - timed0
        in_place = timed <= 0
        if nbytes <= 0 or seconds <= 0:
            return predicted
        planned = _planned_step(self.model)
        busy = None if planned is None else max(planned.compute_seconds, planned.link_seconds)
        if in_place and not self.disk.disk_bound(busy):
            self.rate = 0.0  # not measurable apart from the compute: keep the plan's rate
            return predicted
        self.rate = nbytes / (seconds if in_place else timed)
        self.disk = self.disk.with_rate(self.rate, "seen by this run's first step from disk")
        path = self._file()
        if path is not None:
            from lema.adapters.weights.read_rate import store_run_rate

            store_run_rate(path, self.rate, nbytes, seconds if in_place else timed)
        if hasattr(self.model, "disk"):
            self.model.disk = self.disk
        return predicted_step_seconds(self.model, self.grad_accum)


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
