"""CudaDevice: pinned host staging, a dedicated copy stream, and events.

* Staging buffers are pinned once (``torch.empty(..., pin_memory=True)``), so every
  ``copy_(non_blocking=True)`` is a true asynchronous DMA. RESIDENT weights live in pinned
  buffers too (:meth:`pinned_buffer`, one per unit), and are uploaded straight from them.
* Uploads run on one copy stream. Before copying into a slot, the copy stream waits on
  the event recorded on the compute stream after the slot's last compute
  (:meth:`mark_consumed`); the compute stream waits on the copy-done event
  (:meth:`CudaTicket.wait`). The host never synchronises per layer; it only waits for a
  copy to finish before overwriting that copy's staging buffer (:meth:`host_reusable`).
* Accounting is the allocator's own: ``torch.cuda.memory_allocated`` and
  ``max_memory_allocated``.

Importing this module never needs CUDA; constructing a :class:`CudaDevice` without it
raises :class:`~lema.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import statistics
import threading
import time
from typing import Iterator

import attrs
import torch

from lema.domain.device_traits import CUDA, DeviceTraits
from lema.domain.units import format_size
from lema.errors import ConfigError, DeviceOutOfMemory, PinningRefused


class CudaTicket:
    """A CUDA event recorded after an operation, on the stream that ran it."""

    def __init__(self, event: "torch.cuda.Event") -> None:
        self.event = event

    def wait(self) -> None:
        """Make the *current* stream wait for the operation; the host does not block."""
        torch.cuda.current_stream().wait_event(self.event)

    def done(self) -> bool:
        return self.event.query()

    def host_wait(self) -> None:
        self.event.synchronize()


class CudaDevice:
    """One CUDA GPU as a :class:`~lema.ports.device.Device`.

    Args:
        index: the GPU.
        capacity: bytes LEMA may use (``None``: the GPU's total memory). Checked on every
            :meth:`alloc`; the planner checks the whole run before it starts.

    Raises:
        ConfigError: CUDA is not available, or ``index`` is not a GPU.
    """

    def __init__(self, index: int = 0, capacity: int | None = None) -> None:
        if not torch.cuda.is_available():
            raise ConfigError("CUDA is not available; use device='cpu'")
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(f"device: cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s)); "
                              "use cuda:0 or device='cpu'")
        self.torch_device = torch.device("cuda", index)
        total = torch.cuda.get_device_properties(index).total_memory
        self.capacity = capacity if capacity is not None else total
        self._copy_stream = torch.cuda.Stream(device=self.torch_device)
        self._allocs: dict[int, tuple[str, int]] = {}
        self._tracked: dict[str, int] = {}
        self._lock = threading.Lock()
        self._timeline: list[tuple[object, ...]] = []
        self.host_buffers_allocated = 0
        self.bytes_uploaded = 0
        self.link_bandwidth: float | None = None  # pinned host -> device bytes/s, once measured

    @property
    def traits(self) -> DeviceTraits:
        """A GPU: pinned staging on a copy stream, a runtime reserve, foreach optimizer steps;
        native bf16 from compute capability 8.0."""
        return _traits(self.torch_device.index or 0)

    # -- memory ------------------------------------------------------------------------------

    def alloc(self, nbytes: int, label: str) -> torch.Tensor:
        used = self.current_bytes()
        if self.capacity is not None and used + nbytes > self.capacity:
            raise DeviceOutOfMemory(
                f"device out of memory: {label} asks for {format_size(nbytes)} ({nbytes} bytes) while "
                f"{format_size(used)} of the {format_size(self.capacity)} capacity ({self.capacity} bytes) "
                "is in use; lower batch_size, max_seq_len or prefetch_distance, or raise the device budget"
            )
        try:
            tensor = torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)
        except torch.OutOfMemoryError as exc:
            raise DeviceOutOfMemory(f"device out of memory: {label} asks for {format_size(nbytes)}: {exc}") from None
        with self._lock:
            self._allocs[tensor.data_ptr()] = (label, nbytes)
        return tensor

    def free(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self._allocs.pop(tensor.data_ptr(), None)

    def track(self, label: str, nbytes: int) -> None:
        """Record a label for reporting; the allocator already counts the real bytes."""
        with self._lock:
            self._tracked[label] = nbytes

    def untrack(self, label: str) -> None:
        with self._lock:
            self._tracked.pop(label, None)

    def current_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.torch_device)

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.torch_device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.torch_device)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """The CUDA allocator counts compute allocations itself."""
        yield

    # -- host staging and the link -----------------------------------------------------------

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A pinned host buffer (page-locked, so uploads from it are asynchronous DMA)."""
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        buffer.zero_()
        self.host_buffers_allocated += 1
        return buffer

    def pinned_buffer(self, nbytes: int) -> torch.Tensor:
        """A page-locked host buffer, zeroed once (see :meth:`lema.ports.device.Device.pinned_buffer`)."""
        try:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else format_size(soft)
            raise PinningRefused(f"could not page-lock {format_size(nbytes)} of host memory (locked-memory limit "
                                 f"`ulimit -l`: {limit}; {str(exc).splitlines()[0]})") from None
        buffer.zero_()
        return buffer

    def measure_link(self, nbytes: int = 256 << 20, repeat: int = 5) -> tuple[float, float]:
        """Median host -> device bandwidth (bytes/s) from pinned and from pageable memory.

        Also sets :attr:`link_bandwidth` to the pinned figure (the engine's link floor).
        """
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)
        results = []
        for host in (self.pinned_buffer(nbytes), torch.ones(nbytes, dtype=torch.uint8)):
            times = []
            for _ in range(repeat + 1):
                torch.cuda.synchronize(self.torch_device)
                start = time.perf_counter()
                dev.copy_(host, non_blocking=True)
                torch.cuda.synchronize(self.torch_device)
                times.append(time.perf_counter() - start)
            results.append(nbytes / statistics.median(times[1:]))
        del dev
        self.link_bandwidth = results[0]
        return results[0], results[1]

    def upload(self, host: torch.Tensor, device: torch.Tensor, nbytes: int,
               after: CudaTicket | None = None, label: object = None) -> CudaTicket:
        """Queue the copy on the copy stream after ``after``; returns at once."""
        if nbytes > host.numel() or nbytes > device.numel():
            raise ConfigError(f"upload of {nbytes} bytes overruns a {host.numel()}-byte staging buffer "
                              f"or a {device.numel()}-byte slot")
        event = torch.cuda.Event()
        # Slots are allocated once and never freed while streaming, so no record_stream.
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self._copy_stream):
            if after is not None:
                self._copy_stream.wait_event(after.event)
            device[:nbytes].copy_(host[:nbytes], non_blocking=True)
            event.record(self._copy_stream)
        self.bytes_uploaded += nbytes
        if label is not None:
            self.record("upload_issued", label)
        return CudaTicket(event)

    def download(self, device: torch.Tensor, host: torch.Tensor, nbytes: int, label: object = None) -> CudaTicket:
        """Queue ``host[:nbytes] = device[:nbytes]`` on the copy stream after the compute issued
        so far; returns at once. ``record_stream`` keeps the allocator from reusing the
        device memory before the copy has read it, so the caller may drop it at once."""
        if nbytes > host.numel() or nbytes > device.numel():
            raise ConfigError(f"download of {nbytes} bytes overruns a {device.numel()}-byte device tensor "
                              f"or a {host.numel()}-byte host buffer")
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(self.torch_device))
        done = torch.cuda.Event()
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(computed)
            host[:nbytes].copy_(device[:nbytes], non_blocking=True)
            done.record(self._copy_stream)
        device.record_stream(self._copy_stream)
        if label is not None:
            self.record("download_issued", label)
        return CudaTicket(done)

    def host_reusable(self, ticket: CudaTicket) -> None:
        """Block the host until the DMA out of the staging buffer has finished."""
        ticket.host_wait()

    def mark_consumed(self, slot: torch.Tensor) -> CudaTicket:
        """An event after the compute issued so far on the current stream."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.torch_device))
        return CudaTicket(event)

    def carry(self, nbytes: int, label: object = None) -> CudaTicket:
        """No simulated link here (the copy stream is the link): complete after the work issued so far."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.torch_device))
        return CudaTicket(event)

    def matmul_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """GPUs multiply half precision natively: compute in the activations' dtype."""
        return None

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    # -- timeline ------------------------------------------------------------------------------

    def record(self, kind: str, *fields: object) -> None:
        """Host-side times of the events the engine issues (GPU completion is asynchronous)."""
        if len(self._timeline) < 200_000:
            self._timeline.append((kind, *fields, time.perf_counter()))

    def timeline(self) -> tuple[tuple[object, ...], ...]:
        return tuple(self._timeline)

    def close(self) -> None:
        self.synchronize()


@functools.lru_cache(maxsize=None)
def _traits(index: int) -> DeviceTraits:
    return attrs.evolve(CUDA, bf16=torch.cuda.get_device_capability(index)[0] >= 8)
