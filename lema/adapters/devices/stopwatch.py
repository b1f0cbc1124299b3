"""Stopwatches for :meth:`lema.ports.device.Device.stopwatch`: how long the device spent
between ``start`` and ``stop``, summed over the intervals of a pass.

* :class:`HostStopwatch` (the CPU devices): the host's clock, which is the device's there.
* :class:`EventStopwatch` (CUDA): timing events recorded on the compute stream, read once at
  :meth:`~EventStopwatch.seconds` (one wait for the last event, at the end of a pass). On a
  GPU the host only launches kernels, so its clock measures launches, not compute; an
  interval around a stream wait measures how long the stream stalled on it.
"""

from __future__ import annotations

import time

import torch

__all__ = ["EventStopwatch", "HostStopwatch"]


class HostStopwatch:
    """Sums the host's ``perf_counter`` between each ``start`` and the next ``stop``."""

    def __init__(self) -> None:
        self._total = 0.0
        self._began: float | None = None

    def start(self) -> None:
        self._began = time.perf_counter()

    def stop(self) -> None:
        if self._began is not None:
            self._total += time.perf_counter() - self._began
            self._began = None

    def seconds(self) -> float:
        return self._total


class EventStopwatch:
    """Sums the device time between CUDA events recorded on ``device``'s current stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._began: torch.cuda.Event | None = None

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> None:
        self._began = self._event()

    def stop(self) -> None:
        if self._began is not None:
            self._pairs.append((self._began, self._event()))
            self._began = None

    def seconds(self) -> float:
        """Waits for the last interval's end (the host blocks once), then sums them all."""
        if not self._pairs:
            return 0.0
        self._pairs[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self._pairs) / 1000.0
