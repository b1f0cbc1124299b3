"""ProcMeminfo: the host RAM a run may use, from ``/proc/meminfo`` and the cgroup's memory limit.

``MemAvailable`` is the kernel's estimate of what a new allocation can get without swapping
(free memory plus the page cache it can drop). Inside a container whose cgroup sets
``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1), what is left under that limit counts
when it is smaller.

Example:
    >>> ProcMeminfo().available_bytes() > 0                       # doctest: +SKIP
    True
"""

from __future__ import annotations

from pathlib import Path

from lema.errors import ConfigError


class ProcMeminfo:
    """:class:`~lema.ports.host_memory.HostMemory` read from the running system.

    Args:
        meminfo: the ``/proc/meminfo`` file to read.
        cgroup: the cgroup v2 folder of this process (``None``: found from ``/proc/self/cgroup``).
    """

    def __init__(self, meminfo: str = "/proc/meminfo", cgroup: str | None = None) -> None:
        self.meminfo = Path(meminfo)
        self.cgroup = Path(cgroup) if cgroup is not None else _own_cgroup()
        self._source = "MemAvailable"

    def available_bytes(self) -> int:
        fields = _meminfo(self.meminfo)
        if "MemAvailable" not in fields:
            raise ConfigError(f"{self.meminfo}: no MemAvailable line; cannot tell the host RAM available")
        available, self._source = fields["MemAvailable"], "MemAvailable in /proc/meminfo"
        left = _cgroup_left(self.cgroup) if self.cgroup is not None else None
        if left is not None and left < available:
            available, self._source = left, f"left under the cgroup memory limit ({self.cgroup})"
        return available

    def describe(self) -> str:
        return self._source


def _meminfo(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def _own_cgroup() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    except OSError:
        return None
    return None


def _cgroup_left(folder: Path) -> int | None:
    """``memory.max - memory.current`` of a cgroup v2 folder; None without a limit."""
    try:
        limit = (folder / "memory.max").read_text().strip()
        used = int((folder / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit():
        return None
    return max(0, int(limit) - used)
