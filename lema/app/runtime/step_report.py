"""StepReport: what one pass of the engine moved, how long it waited, and the device's peak."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class StepReport:
    """What one pass moved and how long it waited.

    Attributes:
        bytes_uploaded: host -> device bytes of this pass's weight fetches.
        n_fetches: units fetched.
        wait_seconds: device time spent waiting for weights and offloaded inputs (the
            device's :meth:`~lema.ports.device.Device.stopwatch`: CUDA events on a GPU, the
            host's clock on a CPU).
        compute_seconds: device time of the compute callbacks (the same stopwatch).
        seconds: wall time of the pass.
        device_peak_bytes: the device's peak during the pass (the run's peak, optimizer steps
            included: :meth:`~lema.ports.device.Device.run_peak_bytes`).
        bytes_read: host bytes the weight source copied into staging or slots (0 when every
            upload came straight from page-locked memory).
        link_floor_seconds: ``(bytes_uploaded + 2 * activation_bytes) / device.link_bandwidth``,
            the least time the link needs for this pass (None when the device's bandwidth is
            unknown).
        peak_counts_compute: whether ``device_peak_bytes`` includes every allocation of the
            compute (False on a CPU device that does not count them: then it is the peak of
            what the device holds for the run: slots, resident units, adapters, optimizer
            states and tracked activations).
        timeline: the device's events recorded during the pass (empty if it keeps none).
        activation_bytes: bytes of the checkpointed inputs offloaded (and as many fetched back).
    """

    bytes_uploaded: int
    n_fetches: int
    wait_seconds: float
    compute_seconds: float
    seconds: float
    device_peak_bytes: int
    bytes_read: int = 0
    link_floor_seconds: float | None = None
    peak_counts_compute: bool = True
    timeline: tuple[tuple[Any, ...], ...] = ()
    activation_bytes: int = 0
