"""LateCpuDevice: the CPU device that honours the Device port's asynchrony literally, for tests.

The plain :class:`~lema.adapters.devices.cpu.CpuDevice` finishes most of its work early:
``mark_consumed`` is done the moment it is made, its link runs uploads and downloads in
one order, and a slot keeps its old bytes until something overwrites them. Code that forgets
a wait therefore still computes the right numbers on it, and only fails on a GPU. This
device is as late as the port allows, so a missing wait gives a wrong number on the CPU:

* uploads and downloads complete on worker threads after a random, seeded delay: downloads
  beside uploads (the link is full duplex, as a GPU with a copy engine per direction), and
  uploads on two threads, so they may complete out of order (the port orders an upload only
  after its ``after`` ticket: an engine that waits on one upload's ticket to cover another's
  is caught);
* a destination holds poison from the moment its copy is issued (after the ``after`` ticket)
  until its ticket completes: ``0xFF`` bytes, a NaN in every floating dtype (an integer
  tensor reads the sentinel ``-1`` / ``255``);
* a slot marked consumed (:meth:`mark_consumed`) is poisoned at once, as if the next upload
  had already overwritten it;
* waiting is only through tickets: nothing the engine reads is complete before its ticket.

Its traits are the CPU's standing in for a GPU: weights go through staging buffers (a spare
one, taken in turn, as on CUDA) and slots (no direct reads, no computing in place), so every
path a GPU takes is exercised.
Counting (capacity, peaks) is the CPU device's.

Example:
    >>> dev = LateCpuDevice(seed=1)
    >>> slot, host = dev.alloc(8, "slot"), dev.host_buffer(8)
    >>> ticket = dev.upload(host, slot, 8)
    >>> ticket.wait(); int(slot.sum())
    0
    >>> dev.close()
"""

from __future__ import annotations

import queue
import random
import threading
import time
import weakref

import attrs
import numpy
import torch

from lema.adapters.devices.cpu import CpuDevice, CpuTicket, _memcpy
from lema.adapters.workers import start_worker
from lema.domain.device_traits import CPU, DeviceTraits
from lema.errors import ConfigError

__all__ = ["POISON_BYTE", "LateCpuDevice", "poison"]

POISON_BYTE = 0xFF
UPLOAD_THREADS = 2  # uploads may complete out of order


def poison(tensor: torch.Tensor, nbytes: int | None = None) -> None:
    """Fill the first ``nbytes`` bytes of a flat ``uint8`` tensor with :data:`POISON_BYTE`."""
    flat = tensor.reshape(-1).view(torch.uint8)
    numpy.copyto(flat[: flat.numel() if nbytes is None else nbytes].numpy(), POISON_BYTE)


class LateCpuDevice(CpuDevice):
    """A :class:`CpuDevice` whose every transfer is as late as the Device port allows.

    Args:
        seed: seeds the transfers' delays (the same seed, the same sequence of delays).
        max_delay: the longest delay of one transfer, in seconds (each draws uniformly
            from ``[min_delay, max_delay]``).
        min_delay: the shortest.
        capacity, count_compute, pinned_host: as :class:`CpuDevice`.

    Attributes:
        uploads, downloads: transfers issued so far.
        blocking_waits: ticket waits that found their transfer not done and blocked.

    Raises:
        ConfigError: a negative delay, or ``min_delay > max_delay``.
    """

    def __init__(self, seed: int = 0, max_delay: float = 0.002, min_delay: float = 0.0,
                 capacity: int | None = None, count_compute: bool | None = None, pinned_host: bool = False) -> None:
        if not 0.0 <= min_delay <= max_delay:
            raise ConfigError(f"delays: need 0 <= min_delay ({min_delay}) <= max_delay ({max_delay})")
        super().__init__(capacity=capacity, count_compute=count_compute, pinned_host=pinned_host)
        self._rng = random.Random(seed)
        self.min_delay, self.max_delay = min_delay, max_delay
        self._links: dict[str, tuple[queue.Queue, list[threading.Thread]]] = {}
        self._issued: list[CpuTicket] = []  # transfers not known to be done (synchronize waits for them)
        self._link_lock = threading.Lock()
        self.uploads = 0
        self.downloads = 0
        self.blocking_waits = 0

    @property
    def traits(self) -> DeviceTraits:
        """The CPU standing in for a GPU: staged uploads into slots, nothing in place."""
        return attrs.evolve(CPU, counts_compute=self.count_compute, spare_staging=True)

    def delay(self, direction: str, label: object) -> float:
        """Seconds the next transfer takes (drawn from the seeded generator; tests override it)."""
        with self._link_lock:
            return self._rng.uniform(self.min_delay, self.max_delay)

    # -- the two links -----------------------------------------------------------------------

    def _link(self, direction: str) -> queue.Queue:
        with self._link_lock:
            entry = self._links.get(direction)
            if entry is None or not all(t.is_alive() for t in entry[1]):
                jobs: queue.Queue = queue.Queue()
                threads = [start_worker(self, jobs, LateCpuDevice._transfer, f"lema-late-{direction}-{k}")
                           for k in range(UPLOAD_THREADS if direction == "up" else 1)]
                weakref.finalize(self, _stop_all, jobs, threads)
                entry = self._links[direction] = (jobs, threads)
            return entry[0]

    def _issue(self, direction: str, job: tuple) -> None:
        ticket = job[-1]
        with self._link_lock:
            self._issued = [t for t in self._issued if not t.done()] + [ticket]
        self._link(direction).put(job)

    def _ticket(self) -> "LateTicket":
        return LateTicket(self)

    def upload(self, host: torch.Tensor, device: torch.Tensor, nbytes: int,
               after: CpuTicket | None = None, label: object = None) -> "LateTicket":
        """Poison ``device[:nbytes]`` (at once when ``after`` is done, else when it is), then copy
        ``host[:nbytes]`` into it after a random delay, on the upload link."""
        if nbytes > host.numel() or nbytes > device.numel():
            raise ConfigError(f"upload of {nbytes} bytes overruns a {host.numel()}-byte staging buffer "
                              f"or a {device.numel()}-byte slot")
        ticket = self._ticket()
        poisoned = after is None or after.done()
        if poisoned:
            poison(device, nbytes)
        self.uploads += 1
        self._issue("up", ("up", [host, device], nbytes, after, poisoned, label, self.delay("up", label), ticket))
        return ticket

    def download(self, device: torch.Tensor, host: torch.Tensor, nbytes: int, label: object = None) -> "LateTicket":
        """Poison ``host[:nbytes]`` at once (the compute issued so far is done: the CPU computes
        synchronously), then copy ``device[:nbytes]`` into it after a random delay."""
        if nbytes > host.numel() or nbytes > device.numel():
            raise ConfigError(f"download of {nbytes} bytes overruns a {device.numel()}-byte device tensor "
                              f"or a {host.numel()}-byte host buffer")
        ticket = self._ticket()
        poison(host, nbytes)
        self.downloads += 1
        self._issue("down", ("down", [device, host], nbytes, None, True, label, self.delay("down", label), ticket))
        return ticket

    def _transfer(self, job: tuple) -> None:
        direction, tensors, nbytes, after, poisoned, label, delay, ticket = job
        try:
            if after is not None:
                after.wait()
            source, target = tensors
            if not poisoned:
                poison(target, nbytes)
            time.sleep(delay)
            _memcpy(target[:nbytes], source[:nbytes])
            del source, target
            tensors.clear()  # an offloaded activation stops counting once the copy has read it
            self._landed(direction == "up", nbytes, label)
            ticket._finish()
        except BaseException as exc:  # handed to whoever waits on the ticket
            tensors.clear()
            ticket._finish(exc)

    # -- consumption and waiting -------------------------------------------------------------

    def mark_consumed(self, slot: torch.Tensor) -> CpuTicket:
        """The compute is done with ``slot`` (it runs synchronously): poison it at once."""
        poison(slot)
        return CpuTicket(done=True)

    def host_reusable(self, ticket: CpuTicket) -> None:
        ticket.wait()

    def synchronize(self) -> None:
        """Block until every transfer issued so far has completed (whatever its outcome)."""
        with self._link_lock:
            issued, self._issued = self._issued, []
        for ticket in issued:
            ticket._event.wait()
        super().synchronize()

    def close(self) -> None:
        with self._link_lock:
            links, self._links = list(self._links.values()), {}
        for jobs, threads in links:
            _stop_all(jobs, threads)
        super().close()


def _stop_all(jobs: queue.Queue, threads: list[threading.Thread]) -> None:
    """Stop every worker of one link (one ``None`` each) and wait for them."""
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        if thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout=10)


class LateTicket(CpuTicket):
    """A transfer's ticket that counts the waits which had to block (tests read the count)."""

    def __init__(self, device: LateCpuDevice) -> None:
        super().__init__()
        self._device = weakref.ref(device)

    def wait(self) -> None:
        if not self.done():
            device = self._device()
            if device is not None:
                with device._link_lock:
                    device.blocking_waits += 1
        super().wait()
