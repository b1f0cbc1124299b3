"""AUTO's host tier: some units held in host RAM (pinned where the device can), the rest streamed.

When the model file does not fit the RAM a run may use, AUTO plans which units fit a share
of the RAM left (:func:`lema.domain.plan.disk_time.host_tier`); :class:`TieredSource` reads
those once, at the start, into buffers of their own (page-locked through the device port's
``pinned_buffer`` on a device that uploads from them, plain RAM on the CPU), and serves them
from there for the rest of the run: they are never read from the file again. Every other
unit comes from the streaming source (a :class:`~lema.adapters.weights.safetensors_source.SafetensorsSource`
with its page-cache policy).

Example:
    >>> tier = TieredSource.hold(stream, held=(1, 2, 3))            # doctest: +SKIP
    >>> tier.bytes_streamed                                         # doctest: +SKIP
    0
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Iterable

import torch

from lema.domain.schedule.slot_layout import unit_buffer_bytes, unit_layout, unit_views
from lema.errors import ConfigError, LemaWarning, PinningRefused
from lema.ports.weights import WeightSource

Allocate = Callable[[int], torch.Tensor]


class TieredSource:
    """A :class:`~lema.ports.weights.WeightSource`: ``held`` units from host RAM, the rest from ``stream``.

    Args:
        stream: the source of every unit not held (and of the held ones, once, at the start).
        held: the unit indices to hold (decoders or the head; not the embedding, which is
            gathered from the stream's mapping).
        allocate: makes each held unit's flat ``uint8`` buffer.
        pinned: the buffers ``allocate`` makes are page-locked (:meth:`host_unit` returns them).

    Attributes:
        held: the units held in RAM.
        held_bytes: their bytes.
        pinned: whether they are page-locked.
        bytes_streamed: bytes of units asked of ``stream`` since the tier was loaded (the
            seam that shows held units are not read again).
        stream: the streaming source.
    """

    def __init__(self, stream: WeightSource, held: Iterable[int], allocate: Allocate, pinned: bool = False) -> None:
        self.stream = stream
        self.spec = stream.spec
        self.held = tuple(sorted(set(held)))
        bad = [u for u in self.held if not 0 < u < len(self.spec.units)]
        if bad:
            raise ConfigError(f"held: unit(s) {bad} are not decoders or the head (1..{len(self.spec.units) - 1})")
        self.pinned = pinned
        self._layouts = {u: unit_layout(self.spec.units[u]) for u in self.held}
        self._buffers: dict[int, torch.Tensor] = {}
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        for u in self.held:
            need = unit_buffer_bytes(self.spec.units[u])
            buffer = allocate(need)
            if buffer.dtype != torch.uint8 or buffer.numel() < need:
                raise ConfigError(f"allocate: returned {buffer.dtype}[{buffer.numel()}], needs a uint8 buffer of "
                                  f"{need} bytes")
            stream.read_unit(u, buffer)  # read once, here; never from the file again
            self._buffers[u] = buffer
            self._views[u] = unit_views(buffer, self._layouts[u])
        self.held_bytes = sum(unit_buffer_bytes(self.spec.units[u]) for u in self.held)
        self._own_copies = 0
        self._lock = threading.Lock()
        self.bytes_streamed = 0

    @classmethod
    def hold(cls, stream: WeightSource, held: Iterable[int], allocate: Allocate, pinned: bool = False,
             fallback: Allocate | None = None) -> "TieredSource":
        """:class:`TieredSource`, falling back to ``fallback`` (plain RAM) with one warning when the
        system refuses to pin that much."""
        try:
            return cls(stream, held, allocate, pinned)
        except PinningRefused as exc:
            if fallback is None:
                raise
            warnings.warn(LemaWarning(f"AUTO's host tier stays in pageable RAM and goes through staging buffers: "
                                      f"{exc}"), stacklevel=2)
            return cls(stream, held, fallback, pinned=False)

    @property
    def bytes_copied(self) -> int:
        """Host bytes written into callers' buffers (the stream's and the tier's)."""
        return self.stream.bytes_copied + self._own_copies

    def read_unit(self, index: int, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :meth:`lema.ports.weights.WeightSource.read_unit` (a held unit: views of its RAM copy)."""
        views = self._views.get(index)
        if views is None:
            need = unit_buffer_bytes(self.spec.units[index]) if 0 <= index < len(self.spec.units) else 0
            got = self.stream.read_unit(index, buffer)
            with self._lock:
                self.bytes_streamed += need
            return got
        if buffer is None:
            return dict(views)
        need = unit_buffer_bytes(self.spec.units[index])
        if buffer.dtype != torch.uint8 or buffer.numel() < need or buffer.device.type != "cpu":
            raise ConfigError(f"buffer: needs a CPU uint8 tensor of at least {need} bytes for unit {index}")
        buffer[:need].copy_(self._buffers[index][:need])
        with self._lock:
            self._own_copies += need
        return unit_views(buffer, self._layouts[index])

    def host_unit(self, index: int) -> torch.Tensor | None:
        """A held unit's page-locked buffer (to upload from directly); else the stream's answer."""
        if index in self._buffers:
            return self._buffers[index] if self.pinned else None
        return self.stream.host_unit(index)

    def __getattr__(self, name: str):  # noqa: ANN204 - the stream's policy attributes (keep_bytes, bytes_dropped, ...)
        if name.startswith("_") or name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)

    def close(self) -> None:
        """Close the stream; the held buffers go with the object."""
        self.stream.close()

    def __enter__(self) -> "TieredSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
