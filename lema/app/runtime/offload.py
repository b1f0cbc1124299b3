"""Activation offload: what the engine does for the schedule's OffloadInput and FetchInput steps.

A training pass keeps each layer's input for the backward (gradient checkpointing at
layer granularity). With offload, the engine takes that input from the pass right after
the layer's forward (:class:`InputStore`) and downloads it into a host buffer kept for that
layer (pinned on CUDA, allocated once and reused every step), without waiting: the device
copy is released as soon as the link has read it. Ahead of the layer's backward it
allocates the input on the device again and uploads it, without waiting; just before the
backward compute the compute waits for that upload and the input goes back to the pass;
after the compute the engine frees it. The order of these steps is the pure schedule's
(:mod:`lema.domain.schedule.layer_schedule`); this module only carries them out.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lema.ports.device import Device, Ticket

# Downloads in flight at once (the one just issued and the previous one): what the plan
# counts. A device keeps an offloaded input's memory until its copy has read it (CUDA:
# ``record_stream``), so downloads that fall behind the forward would hold more inputs.
IN_FLIGHT = 2


class InputStore(Protocol):
    """Where a training pass keeps its checkpointed layer inputs (the engine moves them)."""

    def take_input(self, unit: int) -> torch.Tensor:
        """Hand over ``unit``'s checkpointed input and forget it."""
        ...

    def give_input(self, unit: int, x: torch.Tensor) -> None:
        """Take ``unit``'s checkpointed input back (before its backward compute)."""
        ...


class InputOffloader:
    """The host buffers of offloaded inputs and the inputs in flight, for one engine.

    Args:
        device: the device the inputs live on.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        self._hosts: dict[int, torch.Tensor] = {}  # unit -> host buffer of its offloaded input
        self._offloaded: dict[int, tuple[torch.Size, torch.dtype, int, Ticket]] = {}
        self._restoring: dict[int, tuple[torch.Tensor, Ticket, torch.Size, torch.dtype]] = {}
        self._downloading: list[Ticket] = []  # downloads issued and perhaps not done, oldest first

    @property
    def host_bytes(self) -> int:
        """Bytes of the host buffers allocated so far."""
        return sum(b.numel() for b in self._hosts.values())

    def offload(self, unit: int, inputs: InputStore) -> int:
        """Start copying ``unit``'s input to its host buffer; returns the bytes moved."""
        x = inputs.take_input(unit).detach()
        nbytes = x.numel() * x.element_size()
        host = self._hosts.get(unit)
        if host is None or host.numel() < nbytes:
            host = self._hosts[unit] = self.device.host_buffer(nbytes)
        # At most IN_FLIGHT downloads hold device memory: the host waits for the oldest only
        # when the link has fallen that far behind the forward.
        self._downloading = [t for t in self._downloading if not t.done()]
        while len(self._downloading) >= IN_FLIGHT:
            self.device.host_reusable(self._downloading.pop(0))
        ticket = self.device.download(x.contiguous().view(-1).view(torch.uint8), host, nbytes, label=("x", unit))
        self._downloading.append(ticket)
        self._offloaded[unit] = (x.shape, x.dtype, nbytes, ticket)
        return nbytes

    def fetch(self, unit: int) -> None:
        """Start copying ``unit``'s input back into a new device buffer."""
        shape, dtype, nbytes, downloaded = self._offloaded.pop(unit)
        buffer = self.device.alloc(nbytes, f"input of unit {unit}")
        # After the download into the host buffer (downloads may run beside uploads, on a
        # link of their own: the compute waits for it, without blocking the host on CUDA) and
        # after the compute issued so far (the buffer may be memory it just freed).
        downloaded.wait()
        ticket = self.device.upload(self._hosts[unit], buffer, nbytes, after=self.device.mark_consumed(buffer),
                                    label=("x", unit))
        self._restoring[unit] = (buffer, ticket, shape, dtype)

    def hand_back(self, unit: int, inputs: InputStore | None) -> Any:
        """Before ``unit``'s backward: order the compute after its upload and give it to the
        pass. Returns a token for :meth:`release` (None when the input was never offloaded)."""
        restored = self._restoring.pop(unit, None)
        if restored is None or inputs is None:
            return None
        buffer, ticket, shape, dtype = restored
        ticket.wait()
        inputs.give_input(unit, buffer.view(dtype).view(shape))
        return buffer

    def release(self, token: Any) -> None:
        """After the backward compute: stop counting the fetched input."""
        if token is not None:
            self.device.free(token)

    def drop(self) -> None:
        """Forget what a pass left behind (it failed between an offload and its backward)."""
        self._offloaded.clear()
        self._downloading.clear()
        for buffer, ticket, _, _ in self._restoring.values():
            try:
                ticket.wait()
            except BaseException:  # noqa: S110 - the pass's own error is the one reported
                pass
            self.device.free(buffer)
        self._restoring.clear()

    def close(self) -> None:
        self.drop()
        self._hosts.clear()
