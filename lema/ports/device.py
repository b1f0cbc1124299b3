"""Device: where compute runs, and the only place device memory is allocated and counted.

Adapters: :class:`lema.adapters.devices.cpu.CpuDevice` (the CPU as a device: real
compute, exact byte accounting, a capacity, a simulated link) and
:class:`lema.adapters.devices.cuda.CudaDevice` (pinned staging, a copy stream, events).

Uploads are asynchronous and return a :class:`Ticket`. The engine's contract:

* ``upload(host, dev, n, after=t)`` copies ``host[:n]`` into ``dev[:n]`` once ``t`` (the
  slot's consumed ticket) has completed, without blocking the caller;
* ``ticket.wait()`` makes the *compute* wait for that upload (on CUDA: the current stream
  waits on an event; the host does not block);
* ``host_reusable(ticket)`` blocks the *host* until the staging buffer may be rewritten;
* ``mark_consumed(slot)`` records that the compute issued so far is done reading a slot;
* ``download(dev, host, n)`` copies ``dev[:n]`` into ``host[:n]`` once the compute issued so
  far is done (activation offload), without blocking the caller; the caller may drop its
  references to ``dev`` at once: the device keeps the memory until the copy has read it.
  Downloads may run beside uploads (a link per direction, as a GPU's copy engines): an
  upload that reads what a download wrote is issued after ``ticket.wait()`` on the download.

:class:`lema.adapters.devices.late_cpu.LateCpuDevice` honours this contract literally (late
transfers, poisoned destinations and released slots), so tests catch a missing wait.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch

from lema.domain.device_traits import DeviceTraits

__all__ = ["Device", "DeviceTraits", "Stopwatch", "Ticket"]


@runtime_checkable
class Ticket(Protocol):
    """Completion of an asynchronous device operation."""

    def wait(self) -> None:
        """Order the compute after the operation (re-raises its error, if it failed)."""
        ...

    def done(self) -> bool:
        """True once the operation has finished (never blocks)."""
        ...


class Stopwatch(Protocol):
    """Device time summed over ``start``/``stop`` intervals (see :meth:`Device.stopwatch`)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def seconds(self) -> float:
        """The summed intervals, in seconds of the device's time (may wait for the last one)."""
        ...


@runtime_checkable
class Device(Protocol):
    """A compute device with counted memory and an asynchronous host -> device link.

    Attributes:
        traits: what the device is (:class:`~lema.domain.device_traits.DeviceTraits`): the
            engine, bootstrap and planner read it instead of probing the device.
        torch_device: where tensors for this device live.
        capacity: bytes the device may hold, or ``None`` for no limit.
        link_bandwidth: host -> device bytes per second from page-locked memory, when
            known (simulated on the CPU, measured on CUDA by :meth:`measure_link`); the
            engine's report turns it into a time floor.
        bytes_uploaded: host -> device bytes copied so far.
    """

    @property
    def traits(self) -> DeviceTraits: ...

    torch_device: torch.device
    capacity: int | None
    link_bandwidth: float | None
    bytes_uploaded: int

    def alloc(self, nbytes: int, label: str) -> torch.Tensor:
        """A flat ``uint8`` device tensor of ``nbytes``, counted under ``label``.

        Raises:
            DeviceOutOfMemory: naming ``label``, ``nbytes``, the capacity and the current use.
        """
        ...

    def free(self, tensor: torch.Tensor) -> None:
        """Stop counting a tensor from :meth:`alloc` (its memory goes when unreferenced)."""
        ...

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A flat ``uint8`` host staging buffer (pinned on CUDA), touched once; not counted."""
        ...

    def pinned_buffer(self, nbytes: int) -> torch.Tensor:
        """A flat ``uint8`` host buffer the device uploads from directly, with no staging
        copy (page-locked on CUDA), touched once; not counted as device memory.

        Raises:
            PinningRefused: the system would not lock that much memory (the message names
                the limit).
        """
        ...

    def upload(self, host: torch.Tensor, device: torch.Tensor, nbytes: int,
               after: Ticket | None = None, label: object = None) -> Ticket:
        """Start copying ``host[:nbytes]`` into ``device[:nbytes]`` after ``after``; returns at once."""
        ...

    def carry(self, nbytes: int, label: object = None) -> Ticket:
        """A ticket that completes once a simulated link (``traits.simulated_link``) would have
        moved ``nbytes`` already read into a slot; at once on a device with a real link."""
        ...

    def download(self, device: torch.Tensor, host: torch.Tensor, nbytes: int, label: object = None) -> Ticket:
        """Start copying ``device[:nbytes]`` into ``host[:nbytes]`` after the compute issued so far;
        returns at once. The ticket completes when ``host`` holds the bytes."""
        ...

    def host_reusable(self, ticket: Ticket) -> None:
        """Block until the staging buffer of the upload ``ticket`` may be overwritten."""
        ...

    def mark_consumed(self, slot: torch.Tensor) -> Ticket:
        """A ticket that completes when the compute issued so far has finished reading ``slot``."""
        ...

    def track(self, label: str, nbytes: int) -> None:
        """Count ``nbytes`` of other device memory (LoRA state, saved activations) under ``label``."""
        ...

    def untrack(self, label: str) -> None:
        """Stop counting what :meth:`track` counted under ``label``."""
        ...

    def current_bytes(self) -> int:
        """Device bytes in use now."""
        ...

    def peak_bytes(self) -> int:
        """Most device bytes in use at once since construction or :meth:`reset_peak`."""
        ...

    def reset_peak(self) -> None:
        """Start :meth:`peak_bytes` over from the bytes in use now (an engine does it per pass)."""
        ...

    def run_peak_bytes(self) -> int:
        """Most device bytes in use at once since construction: :meth:`reset_peak` does not
        clear it (the run's peak, optimizer steps between passes included)."""
        ...

    def stopwatch(self) -> Stopwatch:
        """A new stopwatch of the device's own time: the host's clock on a CPU, events on the
        compute stream on a GPU (where the host's clock times kernel launches)."""
        ...

    def measuring(self) -> AbstractContextManager[None]:
        """Within this context, the compute's own allocations are counted too."""
        ...

    def record(self, kind: str, *fields: object) -> None:
        """Append ``(kind, *fields, time)`` to the timeline, when the device keeps one."""
        ...

    def timeline(self) -> tuple[tuple[object, ...], ...]:
        """The events recorded so far (empty when the device keeps none)."""
        ...

    def matmul_dtype(self, dtype: "torch.dtype") -> "torch.dtype | None":
        """The dtype products with frozen weights should use for ``dtype`` activations,
        or None for ``dtype`` itself (a CPU without fast bf16 answers float32)."""
        ...

    def synchronize(self) -> None:
        """Block until every operation issued to the device has finished."""
        ...

    def close(self) -> None:
        """Stop background workers."""
        ...
