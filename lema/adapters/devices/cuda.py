"""CudaDevice: pinned host staging, a dedicated copy stream, and events.

* Staging buffers are pinned once (``torch.empty(..., pin_memory=True)``), so every
  ``copy_(non_blocking=True)`` is a true asynchronous DMA. RESIDENT weights live in pinned
  buffers too (:meth:`pinned_buffer`, one per unit), and are uploaded straight from them.
* Uploads run on an upload stream, downloads (activation offload) on a stream of their own
  (PCIe is full duplex: a copy engine per direction). Before copying into a slot, the
  upload stream waits on the event recorded on the compute stream after the slot's last
  compute (:meth:`mark_consumed`); the compute stream waits on the copy-done event
  (:meth:`CudaTicket.wait`). Every stream is the one of *this* device
  (``torch.cuda.current_stream(device)``), whatever the current GPU is. The host never
  synchronises per layer; it only waits for a copy to finish before overwriting that copy's
  staging buffer (:meth:`host_reusable`).
* Capacity is what ``torch.cuda.mem_get_info`` found free at start (the CUDA context and
  other processes already out of it), within the budget; the traits' runtime reserve covers
  the workspaces, the allocator's slack and NCCL (:mod:`lema.adapters.devices.cuda_sizing`).
* Accounting is the allocator's own: ``memory_allocated`` for the current use, and the peak
  of ``max_memory_reserved`` (what the card really holds: the allocator's rounding and
  fragments) next to ``max_memory_allocated`` (:meth:`peak_allocated_bytes`).
* Pinned host buffers are registered at their exact size (``cudaHostRegister``), not taken
  from PyTorch's caching host allocator, which rounds each request up to a power of two.
* The timeline is kept only when asked (``record_timeline``); device time comes from CUDA
  events (:meth:`stopwatch`: the engine's compute and wait seconds); the run's peak outlives
  the per-pass reset (:meth:`run_peak_bytes`).

Importing this module never needs CUDA; constructing a :class:`CudaDevice` without it
raises :class:`~lema.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import resource
import weakref
import statistics
import threading
import time
from typing import Iterator

import attrs
import torch

from lema.adapters.devices.cuda_sizing import cuda_capacity, cuda_reserve
from lema.adapters.devices.stopwatch import EventStopwatch
from lema.domain.device_traits import CUDA, DeviceTraits
from lema.domain.units import format_size
from lema.errors import ConfigError, DeviceOutOfMemory, PinningRefused


class CudaTicket:
    """A CUDA event recorded after an operation, on the stream that ran it."""

    def __init__(self, event: "torch.cuda.Event", device: torch.device) -> None:
        self.event = event
        self.device = device

    def wait(self) -> None:
        """Make the device's current stream wait for the operation; the host does not block.
        The stream is the one of the ticket's device, not of the current GPU (with
        ``cuda:1``, the current GPU's stream would be cuda:0's and order nothing)."""
        torch.cuda.current_stream(self.device).wait_event(self.event)

    def done(self) -> bool:
        return self.event.query()

    def host_wait(self) -> None:
        self.event.synchronize()


class CudaDevice:
    """One CUDA GPU as a :class:`~lema.ports.device.Device`.

    Args:
        index: the GPU.
        capacity: bytes LEMA may use (``None``: what was free on the GPU at start). Checked
            on every :meth:`alloc`; the planner checks the whole run before it starts.
        ranks: processes in the run (NCCL's buffers join the runtime reserve when more than one).
        record_timeline: keep a host-side timeline of the engine's events (``lema bench
            --trace``); off by default: a training run pays nothing for it.

    Raises:
        ConfigError: CUDA is not available, or ``index`` is not a GPU.
    """

    def __init__(self, index: int = 0, capacity: int | None = None, ranks: int = 1,
                 record_timeline: bool = False) -> None:
        if not torch.cuda.is_available():
            raise ConfigError("CUDA is not available; use device='cpu'")
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(f"device: cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s)); "
                              "use cuda:0 or device='cpu'")
        self.torch_device = torch.device("cuda", index)
        free, total = torch.cuda.mem_get_info(self.torch_device)  # creates the context first: it is out of `free`
        self.capacity = cuda_capacity(free, total, capacity, held=torch.cuda.memory_reserved(self.torch_device))
        self.runtime_reserve = cuda_reserve(ranks=ranks, in_use=self.capacity)
        self._traits = attrs.evolve(CUDA, runtime_reserve=self.runtime_reserve,
                                    bf16=torch.cuda.get_device_capability(self.torch_device)[0] >= 8)
        self._copy_stream = torch.cuda.Stream(device=self.torch_device)  # uploads
        self._download_stream = torch.cuda.Stream(device=self.torch_device)  # downloads: the other direction
        self._allocs: dict[int, tuple[str, int]] = {}
        self._run_peak = 0
        self._tracked: dict[str, int] = {}
        self._lock = threading.Lock()
        self._timeline: list[tuple[object, ...]] | None = [] if record_timeline else None
        self.host_buffers_allocated = 0
        self.bytes_uploaded = 0
        self.link_bandwidth: float | None = None  # pinned host -> device bytes/s, once measured

    @property
    def traits(self) -> DeviceTraits:
        """A GPU: pinned staging on copy streams, the runtime reserve this run needs
        (:func:`~lema.adapters.devices.cuda_sizing.cuda_reserve`), foreach optimizer steps;
        native bf16 from compute capability 8.0."""
        return self._traits

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
        """The most the allocator held at once (reserved: tensors, its rounding and fragments),
        what decides whether the card runs out."""
        return max(torch.cuda.max_memory_reserved(self.torch_device), self.peak_allocated_bytes())

    def peak_allocated_bytes(self) -> int:
        """The most bytes of live tensors at once."""
        return torch.cuda.max_memory_allocated(self.torch_device)

    def reset_peak(self) -> None:
        self._run_peak = max(self._run_peak, self.peak_bytes())  # the run's peak outlives the reset
        torch.cuda.reset_peak_memory_stats(self.torch_device)

    def run_peak_bytes(self) -> int:
        """The most the allocator held at once since construction (passes and optimizer steps)."""
        return max(self._run_peak, self.peak_bytes())

    def stopwatch(self) -> EventStopwatch:
        """Device time from CUDA events on the compute stream, not the host's launches."""
        return EventStopwatch(self.torch_device)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """The CUDA allocator counts compute allocations itself."""
        yield

    # -- host staging and the link -----------------------------------------------------------

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A pinned host buffer (page-locked, so uploads from it are asynchronous DMA)."""
        buffer = self.pinned_buffer(nbytes)
        self.host_buffers_allocated += 1
        return buffer

    def pinned_buffer(self, nbytes: int) -> torch.Tensor:
        """A page-locked host buffer of exactly ``nbytes``, zeroed once (see
        :meth:`lema.ports.device.Device.pinned_buffer`): ordinary memory registered with
        ``cudaHostRegister`` and unregistered when the tensor goes, not the caching host
        allocator's power-of-two block (a 404 MB 7B layer would lock 512 MiB)."""
        buffer = torch.zeros(nbytes, dtype=torch.uint8)  # touched once: its pages exist before they are locked
        if nbytes == 0:
            return buffer
        try:
            _register(buffer)
        except RuntimeError as exc:
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else format_size(soft)
            raise PinningRefused(f"could not page-lock {format_size(nbytes)} of host memory (locked-memory limit "
                                 f"`ulimit -l`: {limit}; {str(exc).splitlines()[0]})") from None
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
        return CudaTicket(event, self.torch_device)

    def download(self, device: torch.Tensor, host: torch.Tensor, nbytes: int, label: object = None) -> CudaTicket:
        """Queue ``host[:nbytes] = device[:nbytes]`` on the download stream after the compute
        issued so far; returns at once. ``record_stream`` keeps the allocator from reusing the
        device memory before the copy has read it, so the caller may drop it at once. It runs
        beside the uploads (the other direction of the link): an upload of what it wrote
        waits on its ticket (see :class:`lema.ports.device.Device`)."""
        if nbytes > host.numel() or nbytes > device.numel():
            raise ConfigError(f"download of {nbytes} bytes overruns a {device.numel()}-byte device tensor "
                              f"or a {host.numel()}-byte host buffer")
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(self.torch_device))
        done = torch.cuda.Event()
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self._download_stream):
            self._download_stream.wait_event(computed)
            host[:nbytes].copy_(device[:nbytes], non_blocking=True)
            done.record(self._download_stream)
        device.record_stream(self._download_stream)
        if label is not None:
            self.record("download_issued", label)
        return CudaTicket(done, self.torch_device)

    def host_reusable(self, ticket: CudaTicket) -> None:
        """Block the host until the DMA out of the staging buffer has finished."""
        ticket.host_wait()

    def mark_consumed(self, slot: torch.Tensor) -> CudaTicket:
        """An event after the compute issued so far on the current stream."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.torch_device))
        return CudaTicket(event, self.torch_device)

    def carry(self, nbytes: int, label: object = None) -> CudaTicket:
        """No simulated link here (the copy stream is the link): complete after the work issued so far."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.torch_device))
        return CudaTicket(event, self.torch_device)

    def matmul_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """GPUs multiply half precision natively: compute in the activations' dtype."""
        return None

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    # -- timeline ------------------------------------------------------------------------------

    def record(self, kind: str, *fields: object) -> None:
        """Host-side times of the events the engine issues (GPU completion is asynchronous),
        only when the device was asked to keep a timeline."""
        if self._timeline is not None and len(self._timeline) < 200_000:
            self._timeline.append((kind, *fields, time.perf_counter()))

    def timeline(self) -> tuple[tuple[object, ...], ...]:
        return tuple(self._timeline) if self._timeline is not None else ()

    def close(self) -> None:
        self.synchronize()


def _register(buffer: torch.Tensor) -> None:
    """Page-lock ``buffer``'s memory in place at its exact size, and unlock it when the
    tensor's storage is collected.

    Raises:
        RuntimeError: the driver refused (the locked-memory limit, or no memory).
    """
    cudart = torch.cuda.cudart()
    pointer, nbytes = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    status = cudart.cudaHostRegister(pointer, nbytes, 0)
    code = int(getattr(status, "value", status))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {code}")
    weakref.finalize(buffer, cudart.cudaHostUnregister, pointer)
