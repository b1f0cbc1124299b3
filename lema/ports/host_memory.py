"""HostMemory: how much RAM this process may still fill (read from the system by an adapter).

Adapter: :class:`lema.adapters.host_memory.ProcMeminfo` (``/proc/meminfo`` and the cgroup's
limit). Tests pass a fake with a smaller number.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class HostMemory(Protocol):
    """The host RAM a run may use."""

    def available_bytes(self) -> int:
        """Bytes of RAM a new allocation can still get without swapping or an OOM kill."""
        ...

    def describe(self) -> str:
        """Where the number comes from, for messages (``"MemAvailable of /proc/meminfo"``)."""
        ...
