"""How many CPUs this process may really use, and torch's thread count to match.

torch sizes its intra-op pool from the cores it sees, not from a container's CPU quota: a
job limited to 2 CPUs (``docker --cpus 2``, a Kubernetes limit, a Slurm allocation) on a
64-core host runs 64 threads that the kernel throttles in turns. Each operator's threads
then wait for each other (the same stall as two busy programs sharing the cores: docs
/benchmarks.md, "Under contention"). So LEMA lowers torch's thread count to the CPUs the
process may use (affinity and quota), unless the user chose a count with
``OMP_NUM_THREADS``; it never raises a count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``2.5``), or None when unlimited or unknown.

    Reads cgroup v2's ``cpu.max`` ("max 100000" or "200000 100000") or v1's
    ``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (-1: no quota).
    """
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text(encoding="ascii").strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100000)
        v1 = root / "cpu" if (root / "cpu").is_dir() else root
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text(encoding="ascii"))
        period_us = int((v1 / "cpu.cfs_period_us").read_text(encoding="ascii"))
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may run on at once: its affinity, capped by its cgroup's quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def fit_torch_threads(root: Path = CGROUP) -> int:
    """Lower torch's intra-op threads to :func:`usable_cpus` unless the user set them; returns the count."""
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ:
        return threads
    usable = usable_cpus(root)
    if threads > usable:
        torch.set_num_threads(usable)
        return usable
    return threads
