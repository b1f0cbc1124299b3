"""RESIDENT on several local ranks: the weights are file pages shared through the page cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lema.adapters.weights.resident_source import ResidentSource
from tests.stream_models import write_model

SMAPS = Path("/proc/self/smaps")


def mappings_of(path: Path) -> list[dict[str, int]]:
    """This process's /proc/self/smaps entries for ``path`` (sizes in bytes)."""
    entries, current = [], None
    for line in SMAPS.read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and ":" not in fields[0]:  # a mapping's header line
            current = {} if len(fields) >= 6 and fields[5] == str(path) else None
            if current is not None:
                entries.append(current)
        elif current is not None and len(fields) >= 2 and fields[0].endswith(":") and fields[1].isdigit():
            current[fields[0][:-1]] = int(fields[1]) * 1024
    return entries


@pytest.mark.skipif(not SMAPS.exists(), reason="needs Linux /proc/self/smaps")
def test_two_shared_sources_hold_one_copy_of_the_weights(tmp_path):
    spec, root, _ = write_model(tmp_path / "model", layers=48)
    file = (root / "model.safetensors").resolve()
    first = ResidentSource.shared_from_safetensors(spec, root)
    second = ResidentSource.shared_from_safetensors(spec, root)  # what a second local rank does
    weights = first.nbytes
    assert weights == second.nbytes > 100 * 4096
    # The kernel may reclaim clean file pages between the load and the look (this machine runs
    # proactive reclaim): touch every page of both again right before reading /proc, up to
    # three times, so the test checks sharing, not the reclaim policy.
    for _ in range(3):
        for source in (first, second):
            for unit in spec.units:
                for tensor in source.read_unit(unit.index).values():
                    if tensor.numel():
                        int(tensor.reshape(-1).view(torch.uint8).numpy()[::4096].sum())
        entries = mappings_of(file)
        rss = sum(e["Rss"] for e in entries)
        if rss >= 2 * (weights - 4096):
            break
    assert len(entries) == 2
    # Every weight page is resident (read in at construction) in both mappings...
    assert rss >= 2 * (weights - 4096)
    # ...and they are the same physical pages, each counted half per mapping. (A few pages
    # next to the weights may be mapped by one of them only, by the kernel's fault-around.)
    assert sum(e["Private_Clean"] + e["Private_Dirty"] for e in entries) <= weights / 20
    assert sum(e["Pss"] for e in entries) == pytest.approx(rss / 2, rel=0.05)
    for unit in spec.units:
        a, b = first.read_unit(unit.index), second.read_unit(unit.index)
        assert all(a[k].data_ptr() != b[k].data_ptr() and a[k].equal(b[k]) for k in a)
