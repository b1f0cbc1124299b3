"""CpuDevice: the CPU playing the accelerator, with exact accounting and a capacity.

It computes for real (CPU tensors), counts every byte it is asked to hold (slots,
resident units, what callers :meth:`track`, and, when ``count_compute`` is on, inside
:meth:`measuring`, every storage the compute allocates), keeps the peak, and raises
:class:`~lema.errors.DeviceOutOfMemory` when a request would pass its capacity.

Counting the compute costs a Python call per operator, so it is on only where it is
needed: when a capacity must be enforced (the CPU standing in for a smaller GPU), in
tests, plan verification and ``lema bench --trace``. Without it the peak is that of what
the device holds for the run (slots, resident units, adapters, optimizer states, tracked
activations) and :attr:`counts_compute` says so. Uploads run on a worker thread, like a copy
stream, optionally slowed to a simulated link bandwidth, and every step is recorded on a
timeline so tests can check overlap structurally rather than by timing. Downloads
(activation offload) run on the same worker: the device bytes of an offloaded tensor stop
counting when the copy has read them and the caller has let go of the tensor, as a GPU's
memory is freed once its copy to the host is done.

Example:
    >>> dev = CpuDevice(capacity=1 << 20)
    >>> slot = dev.alloc(4096, "slot 0")
    >>> dev.current_bytes()
    4096
    >>> dev.close()
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
import weakref
from typing import Iterator

import attrs
import numpy
import torch

from lema.adapters.devices.allocation_counter import AllocationCounter, paused
from lema.adapters.devices.half_matmul import half_matmul_is_slow
from lema.adapters.devices.stopwatch import HostStopwatch
from lema.adapters.workers import start_worker, stop_worker
from lema.domain.device_traits import CPU, DeviceTraits
from lema.domain.units import format_size
from lema.errors import ConfigError, DeviceOutOfMemory, PinningRefused

_TIMELINE_MAX = 200_000


class CpuTicket:
    """Completion of one operation of the CPU device's upload worker."""

    def __init__(self, done: bool = False) -> None:
        self._event = threading.Event()
        self._error: BaseException | None = None
        if done:
            self._event.set()

    def _finish(self, error: BaseException | None = None) -> None:
        self._error = error
        self._event.set()

    def wait(self) -> None:
        self._event.wait()
        if self._error is not None:
            raise self._error

    def done(self) -> bool:
        return self._event.is_set()


class CpuDevice:
    """The CPU as a :class:`~lema.ports.device.Device`.

    Args:
        capacity: bytes the device may hold (``None``: unlimited, still counted).
        link_bandwidth: simulated host -> device bytes per second (``None``: memcpy speed).
        record_timeline: keep a timeline of fetch/upload/compute/release events.
        count_compute: count every storage the compute allocates inside :meth:`measuring`
            (needed to enforce ``capacity`` and to compare with the plan; costs a Python
            call per op). None (the default): on exactly when a capacity is set.
        direct_reads: let an engine read weights straight into its slots (no staging copy);
            with a simulated link the slot is then handed over after the link's time
            (:meth:`carry`), as a GPU's copy engine moves a staged unit without the CPU.
        pinned_host: play a device that uploads straight from "page-locked" host buffers
            (:meth:`pinned_buffer`), as CUDA does; for tests of the RESIDENT upload path.
        in_place: compute on the weights where the host holds them (the mapped file's pages,
            or RESIDENT's RAM copy): no slots, no copy per step. The CPU training for real,
            not standing in for a smaller device: ignored when ``link_bandwidth`` simulates
            a link (see :attr:`reads_in_place`).

    Raises:
        ConfigError: a non-positive capacity or bandwidth.
    """

    def __init__(self, capacity: int | None = None, link_bandwidth: float | None = None,
                 record_timeline: bool = True, count_compute: bool | None = None, direct_reads: bool = False,
                 pinned_host: bool = False, in_place: bool = False) -> None:
        if capacity is not None and capacity <= 0:
            raise ConfigError(f"capacity: {capacity} must be a positive number of bytes (or None)")
        if link_bandwidth is not None and link_bandwidth <= 0:
            raise ConfigError(f"link_bandwidth: {link_bandwidth} must be positive bytes/s (or None)")
        self.torch_device = torch.device("cpu")
        self.capacity = capacity
        self.link_bandwidth = link_bandwidth
        # Counting every storage costs a Python call per op (a fifth to a third of a small
        # model's step), so it is on only when a capacity must hold (or when asked).
        self.count_compute = capacity is not None if count_compute is None else bool(count_compute)
        self.pinned_host = pinned_host
        # The device's memory is host memory: an engine may read weights straight into its
        # slots instead of staging them and "uploading" (a second copy).
        self.direct_reads = direct_reads
        # The CPU's memory is the host's: an engine may compute on the source's own tensors.
        self.reads_in_place = in_place and link_bandwidth is None
        self._lock = threading.RLock()
        self._current = 0
        self._peak = self._run_peak = 0
        self._allocs: dict[int, tuple[str, int]] = {}  # data_ptr -> (label, nbytes)
        self._tracked: dict[str, int] = {}
        self._counter = AllocationCounter(self._count_compute, self._uncount)
        self._measuring = threading.local()
        self._timeline: collections.deque | None = collections.deque(maxlen=_TIMELINE_MAX) if record_timeline else None
        self._jobs: queue.Queue = queue.Queue()
        self._finalizer: weakref.finalize | None = None
        self._worker: threading.Thread | None = None
        self.host_buffers_allocated = 0  # how many staging buffers were ever made (tests)
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0

    # -- accounting --------------------------------------------------------------------------

    def _count(self, nbytes: int, label: str) -> None:
        with self._lock:
            if self.capacity is not None and self._current + nbytes > self.capacity:
                raise DeviceOutOfMemory(
                    f"device out of memory: {label} asks for {format_size(nbytes)} ({nbytes} bytes) while "
                    f"{format_size(self._current)} of the {format_size(self.capacity)} capacity "
                    f"({self.capacity} bytes) is in use; lower batch_size, max_seq_len or prefetch_distance, "
                    "or raise the device budget"
                )
            self._current += nbytes
            self._peak = max(self._peak, self._current)

    def _uncount(self, nbytes: int) -> None:
        with self._lock:
            self._current -= nbytes

    def _count_compute(self, nbytes: int, op: str) -> None:
        self._count(nbytes, f"compute ({op})")

    def alloc(self, nbytes: int, label: str) -> torch.Tensor:
        """See :meth:`lema.ports.device.Device.alloc`."""
        self._count(nbytes, label)
        with paused():
            # Written once now, so first-touch page faults are paid here, not in the first pass.
            tensor = torch.zeros(nbytes, dtype=torch.uint8)
        with self._lock:
            self._allocs[tensor.data_ptr()] = (label, nbytes)
        return tensor

    def free(self, tensor: torch.Tensor) -> None:
        with self._lock:
            entry = self._allocs.pop(tensor.data_ptr(), None)
            if entry is not None:
                self._current -= entry[1]

    def track(self, label: str, nbytes: int) -> None:
        """Count ``nbytes`` under ``label`` (replacing what ``label`` counted before).

        Use it for memory made outside :meth:`measuring` (inside, it is counted already).
        """
        self.untrack(label)
        self._count(nbytes, label)
        with self._lock:
            self._tracked[label] = nbytes

    def untrack(self, label: str) -> None:
        with self._lock:
            self._current -= self._tracked.pop(label, 0)

    def current_bytes(self) -> int:
        with self._lock:
            return self._current

    def peak_bytes(self) -> int:
        with self._lock:
            return self._peak

    def reset_peak(self) -> None:
        with self._lock:
            self._run_peak = max(self._run_peak, self._peak)
            self._peak = self._current

    def run_peak_bytes(self) -> int:
        with self._lock:
            return max(self._run_peak, self._peak)

    def stopwatch(self) -> HostStopwatch:
        return HostStopwatch()

    def usage(self) -> dict[str, int]:
        """Bytes in use by label (allocations, tracked items, and ``"compute"``)."""
        with self._lock:
            out: dict[str, int] = {}
            for label, nbytes in list(self._allocs.values()) + list(self._tracked.items()):
                out[label] = out.get(label, 0) + nbytes
        out["compute"] = self._counter.live_bytes
        return out

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Count the storages the compute allocates in this thread (forward and backward)."""
        depth = getattr(self._measuring, "depth", 0)
        self._measuring.depth = depth + 1
        try:
            if depth or not self.count_compute:
                yield
            else:
                with self._counter:
                    yield
        finally:
            self._measuring.depth = depth

    # -- host staging and the link -----------------------------------------------------------

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 host buffer, written once so its pages exist before the first read."""
        with paused():
            buffer = torch.zeros(nbytes, dtype=torch.uint8)
        self.host_buffers_allocated += 1
        return buffer

    @property
    def counts_compute(self) -> bool:
        """True when the peak includes every storage the compute allocated."""
        return self.count_compute

    @property
    def traits(self) -> DeviceTraits:
        """The CPU: in place (training for real) or playing a smaller device through slots,
        read into directly or over a simulated link. ``pinned_host`` only lets
        :meth:`pinned_buffer` answer (RESIDENT upload tests); the plan stays the CPU's."""
        return attrs.evolve(CPU, in_place=self.reads_in_place, direct_reads=self.direct_reads,
                            counts_compute=self.count_compute, simulated_link=self.link_bandwidth is not None)

    def pinned_buffer(self, nbytes: int) -> torch.Tensor:
        """See :meth:`lema.ports.device.Device.pinned_buffer`: plain RAM here (the CPU's memory is
        host memory); with ``pinned_host`` the device plays one that uploads from it directly."""
        if not self.pinned_host:
            raise PinningRefused("this CpuDevice has no page-locked host memory (pinned_host=False)")
        with paused():
            return torch.zeros(nbytes, dtype=torch.uint8)

    def upload(self, host: torch.Tensor, device: torch.Tensor, nbytes: int,
               after: CpuTicket | None = None, label: object = None) -> CpuTicket:
        """Queue ``device[:nbytes] = host[:nbytes]`` on the worker (after ``after``); returns at once."""
        if nbytes > host.numel() or nbytes > device.numel():
            raise ConfigError(f"upload of {nbytes} bytes overruns a {host.numel()}-byte staging buffer "
                              f"or a {device.numel()}-byte slot")
        ticket = CpuTicket()
        self._ensure_worker()
        self._jobs.put(("up", [host, device], nbytes, after, label, ticket))
        return ticket

    def carry(self, nbytes: int, label: object = None) -> CpuTicket:
        """The simulated link's time for ``nbytes`` an engine read straight into a slot: the
        ticket completes ``nbytes / link_bandwidth`` later, on the link's worker, in turn with
        the other transfers (no copy: the bytes are in place, as after a DMA)."""
        ticket = CpuTicket()
        self._ensure_worker()
        self._jobs.put(("carry", [], nbytes, None, label, ticket))
        return ticket

    def download(self, device: torch.Tensor, host: torch.Tensor, nbytes: int, label: object = None) -> CpuTicket:
        """Queue ``host[:nbytes] = device[:nbytes]`` on the worker; returns at once.

        The worker holds the only other reference to ``device`` and drops it as soon as the
        bytes are copied, so a caller that lets go at once stops counting them then.
        """
        if nbytes > host.numel() or nbytes > device.numel():
            raise ConfigError(f"download of {nbytes} bytes overruns a {device.numel()}-byte device tensor "
                              f"or a {host.numel()}-byte host buffer")
        ticket = CpuTicket()
        self._ensure_worker()
        self._jobs.put(("down", [device, host], nbytes, None, label, ticket))
        return ticket

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            # A weak reference only, so a device nobody closed is still collected (its
            # finalizer, registered once, stops the worker).
            self._worker = start_worker(self, self._jobs, CpuDevice._copy, "lema-cpu-link")
            if self._finalizer is not None:
                self._finalizer.detach()
            self._finalizer = weakref.finalize(self, stop_worker, self._jobs, self._worker)

    def _copy(self, job: tuple) -> None:
        direction, tensors, nbytes, after, label, ticket = job
        try:
            if after is not None:
                after.wait()
            start = time.perf_counter()
            if direction != "carry":
                source, target = tensors
                _memcpy(target[:nbytes], source[:nbytes])
                del source, target
            if self.link_bandwidth:  # the transfer takes nbytes / bandwidth in all, the copy included
                time.sleep(max(0.0, nbytes / self.link_bandwidth - (time.perf_counter() - start)))
            tensors.clear()  # the source may be freed now (an offloaded activation stops counting)
            self._landed(direction != "down", nbytes, label)
            ticket._finish()
        except BaseException as exc:  # handed to whoever waits on the ticket
            tensors.clear()
            ticket._finish(exc)

    def _landed(self, up: bool, nbytes: int, label: str | None) -> None:
        """A copy of ``nbytes`` has landed: count it and, when labelled, record it."""
        with self._lock:
            self.bytes_uploaded += nbytes if up else 0
            self.bytes_downloaded += 0 if up else nbytes
        if label is not None:
            self.record("upload_done" if up else "download_done", label)

    def measure_link(self, nbytes: int = 64 << 20, repeat: int = 5) -> tuple[float, float]:
        """Host -> device bytes/s (pinned, pageable): the simulated bandwidth when one is set,
        else what one memcpy moves (the CPU's "link" is its memory)."""
        if self.link_bandwidth:
            return self.link_bandwidth, self.link_bandwidth
        with paused():
            src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
            times = []
            for _ in range(repeat + 1):
                start = time.perf_counter()
                dst.numpy()[:] = src.numpy()
                times.append(time.perf_counter() - start)
        speed = nbytes / sorted(times[1:])[len(times[1:]) // 2]
        return speed, speed

    def host_reusable(self, ticket: CpuTicket) -> None:
        """The staging buffer is free once its copy has run."""
        ticket.wait()

    def mark_consumed(self, slot: torch.Tensor) -> CpuTicket:
        """CPU compute is synchronous: once the caller is here, the slot has been read."""
        return CpuTicket(done=True)

    def synchronize(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            marker = CpuTicket()
            self._jobs.put(("up", [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)], 0, None,
                            None, marker))
            marker.wait()

    # -- compute ----------------------------------------------------------------------------------

    def matmul_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype to multiply frozen weights in: fp32 for bf16/fp16 activations when this
        CPU has no fast half-precision products (measured once per process), else None."""
        if dtype not in (torch.bfloat16, torch.float16):
            return None
        return torch.float32 if half_matmul_is_slow(dtype) else None

    # -- timeline ------------------------------------------------------------------------------

    def record(self, kind: str, *fields: object) -> None:
        if self._timeline is not None:
            self._timeline.append((kind, *fields, time.perf_counter()))

    def timeline(self) -> tuple[tuple[object, ...], ...]:
        return tuple(self._timeline) if self._timeline is not None else ()

    def close(self) -> None:
        """Stop the upload worker (after the queued copies)."""
        if self._worker is not None and self._worker.is_alive():
            self._jobs.put(None)
            self._worker.join()
        self._worker = None

    def __enter__(self) -> "CpuDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _memcpy(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target[:] = source`` with one plain memcpy on the calling thread, as a copy engine would.

    Not torch's ``copy_``: it fans out over the intra-op threads, which on a small CPU are
    the compute's own, and a torch parallel operator on this second thread while the main
    thread multiplies gave a wrong result now and then (measured: 2 runs in 28 of
    ``benchmarks/tiled_adamw_accuracy.py`` trained different adapters, 0 in 30 with this copy).
    """
    if target.is_contiguous() and source.is_contiguous():
        numpy.copyto(target.reshape(-1).view(torch.uint8).numpy(), source.reshape(-1).view(torch.uint8).numpy())
        return
    with paused():  # not reached by the engine (its buffers are flat uint8)
        target.copy_(source)
