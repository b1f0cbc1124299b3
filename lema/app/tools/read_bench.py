"""How fast LEMA's weight reader fills memory from a page-cached file, against a plain read.

Both read the same file into a buffer allocated and touched once, in one run: first a
sequential single-threaded ``readinto`` of 8 MiB blocks (what ``cat file > /dev/null``
does), then :class:`~lema.adapters.weights.parallel_read.ParallelReader` with the thread
count the streaming source uses on a GPU. The file is read once before timing so both
start from the page cache.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lema.adapters.weights.parallel_read import ParallelReader
from lema.adapters.weights.safetensors_source import byte_view

BLOCK = 8 << 20


def make_file(path: Path, nbytes: int) -> Path:
    """A file of ``nbytes`` non-zero bytes (kept and reused when it already has that size)."""
    if path.is_file() and path.stat().st_size == nbytes:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(BLOCK)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for done in range(0, nbytes, BLOCK):
            f.write(block[:min(BLOCK, nbytes - done)])
    os.replace(tmp, path)
    return path


def _sequential(path: Path, buffer: torch.Tensor) -> None:
    view = byte_view(buffer, 0, buffer.numel())
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            got = f.readinto(view[done:done + BLOCK])
            if not got:
                break
            done += got


def measure(path: Path, threads: int = 4, repeat: int = 3) -> dict[str, Any]:
    """Median bytes/s of a sequential read and of LEMA's parallel reader over ``path``."""
    nbytes = path.stat().st_size
    buffer = torch.ones(nbytes, dtype=torch.uint8)  # touched once: no first-touch faults in the timing
    _sequential(path, buffer)  # into the page cache
    reader = ParallelReader(threads)
    fd = os.open(path, os.O_RDONLY)
    seq, par = [], []
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            _sequential(path, buffer)
            seq.append(time.perf_counter() - start)
            start = time.perf_counter()
            reader.read([(fd, 0, byte_view(buffer, 0, nbytes), str(path))])
            par.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        reader.close()
    s, p = nbytes / statistics.median(seq), nbytes / statistics.median(par)
    return {"bytes": nbytes, "threads": threads, "sequential_Bps": s, "parallel_Bps": p, "ratio": p / s}
