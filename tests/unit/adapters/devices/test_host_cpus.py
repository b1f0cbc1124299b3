"""The CPUs a process may use: affinity capped by a cgroup quota, and torch's threads fitted to them."""

from __future__ import annotations

import os

import pytest
import torch

from lema.adapters.devices.host_cpus import cgroup_cpu_limit, fit_torch_threads, usable_cpus


def _v2(root, text: str):
    root.mkdir(exist_ok=True)
    (root / "cpu.max").write_text(text)
    return root


def _v1(root, quota: int, period: int = 100000):
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize("text,cpus", [("max 100000\n", None), ("150000 100000\n", 1.5), ("200000 100000", 2.0)])
def test_cgroup_v2_quota_in_cpus(tmp_path, text, cpus):
    assert cgroup_cpu_limit(_v2(tmp_path / "cg", text)) == cpus


@pytest.mark.parametrize("quota,cpus", [(-1, None), (250000, 2.5)])
def test_cgroup_v1_quota_in_cpus(tmp_path, quota, cpus):
    assert cgroup_cpu_limit(_v1(tmp_path / "cg", quota)) == cpus


def test_no_or_unreadable_cgroup_files_mean_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "missing") is None
    assert cgroup_cpu_limit(_v2(tmp_path / "bad", "lots 100000")) is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "none") == affinity
    assert usable_cpus(_v2(tmp_path / "half", "50000 100000")) == 1  # half a CPU still runs one thread
    assert usable_cpus(_v2(tmp_path / "many", f"{(affinity + 8) * 100000} 100000")) == affinity


def test_torch_threads_are_lowered_to_the_quota_unless_the_user_set_them(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        one_cpu = _v2(tmp_path / "cg", "100000 100000")
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert fit_torch_threads(one_cpu) == 4 and torch.get_num_threads() == 4  # the user's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert fit_torch_threads(one_cpu) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(1)
        assert fit_torch_threads(tmp_path / "none") == 1  # never raised
    finally:
        torch.set_num_threads(before)
