"""The drive's read rate, measured on a sample of the model's own file and cached per drive.

:func:`measure_read_rate` reads a few spread-out chunks of the file (``sample`` bytes in all)
the way a streamed run does (large positional reads by a few threads), after dropping those
chunks' pages from the page cache (``posix_fadvise(DONTNEED)``), and drops them again after:
the number is the drive's, not the page cache's, and the machine's cache is left as it was.
Holes of a sparse file (read as zeros without touching the drive) are skipped; a file with
no data to sample, or whose pages cannot be dropped (mapped by another process), gives None.

:func:`read_rate` returns the cached rate of the drive holding the file when there is one
(``$LEMA_CACHE``, default ``~/.cache/lema``, ``/calibration/disk-<machine>-<device>.json``,
written atomically), else measures it, and caches it when the file held a full sample.

Example:
    >>> read_rate("/models/llama.safetensors")           # doctest: +SKIP
    (2.1e9, 'measured')
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

from lema.adapters.weights.parallel_read import ParallelReader

CHUNK = 32 << 20  # bytes per sampled chunk: many large requests, like a unit's read
SAMPLE = 256 << 20  # bytes sampled in all
ALIGN = 1 << 20


def cache_path(path: str | os.PathLike[str]) -> Path:
    """The cache file of the drive (the file system's device) holding ``path`` on this machine."""
    dev = os.stat(path).st_dev
    root = Path(os.environ.get("LEMA_CACHE") or Path.home() / ".cache" / "lema").expanduser()
    machine = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{platform.node()}-{os.major(dev)}_{os.minor(dev)}")[:120]
    return root / "calibration" / f"disk-{machine}.json"


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The file's data (non-hole) ranges, ``(start, end)``."""
    out, pos = [], 0
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return [(0, size)]
    while pos < size:
        try:
            start = os.lseek(fd, pos, seek_data)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(size, os.lseek(fd, start, seek_hole))
        out.append((start, end))
        pos = end
    return out


def sample_chunks(ranges: list[tuple[int, int]], sample: int = SAMPLE, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """Up to ``sample // chunk`` chunks ``(offset, length)`` spread evenly over the data ranges
    (aligned to 1 MiB, each inside one range)."""
    slots = []
    for start, end in ranges:
        first = -(-start // ALIGN) * ALIGN
        slots += [(off, chunk) for off in range(first, end - chunk + 1, chunk)]
    want = max(1, sample // chunk)
    if len(slots) <= want:
        return slots
    step = len(slots) / want
    return [slots[int(i * step)] for i in range(want)]


def measure_read_rate(path: str | os.PathLike[str], sample: int = SAMPLE, threads: int = 4,
                      chunk: int = CHUNK) -> float | None:
    """Bytes/s read from the drive, or None when no sample could be read from it."""
    fd = os.open(path, os.O_RDONLY)
    reader = ParallelReader(threads)
    try:
        chunks = sample_chunks(_data_ranges(fd, os.fstat(fd).st_size), sample, chunk)
        if not chunks:
            return None
        buffer = torch.empty(chunk, dtype=torch.uint8)
        view = memoryview(buffer.numpy()).cast("B")
        for off, n in chunks:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        for off, n in chunks:
            reader.read([(fd, off, view[:n], str(path))])
        seconds = time.perf_counter() - start
        for off, n in chunks:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        total = sum(n for _, n in chunks)
        # Faster than any drive: the pages stayed cached (mapped elsewhere), not a disk rate.
        return None if seconds <= 0 or total / seconds > 64e9 else total / seconds
    finally:
        reader.close()
        os.close(fd)


def cached_read_rate(path: str | os.PathLike[str]) -> float | None:
    """The cached read rate of the drive holding ``path``, or None."""
    try:
        data = json.loads(cache_path(path).read_text())
        rate = float(data["read_bytes_per_s"])
        return rate if rate > 0 else None
    except (OSError, ValueError, KeyError, TypeError):  # no cache, or a damaged one: a miss
        return None


def read_rate(path: str | os.PathLike[str], sample: int = SAMPLE, chunk: int = CHUNK) -> tuple[float, str] | None:
    """``(bytes/s, where it comes from)`` for the drive holding ``path``: cached, else measured
    (``sample`` bytes in chunks of ``chunk``) and cached; None when it cannot be measured (a
    sparse file, pages that do not drop)."""
    cached = cached_read_rate(path)
    if cached is not None:
        return cached, f"cached: {cache_path(path)}"
    rate = measure_read_rate(path, sample, chunk=chunk)
    if rate is None:
        return None
    if _sampled(path, sample, chunk) >= sample // 2:  # a file too small for a full sample gives a rate, not a calibration
        _store(path, rate)
    return rate, "measured"


def _sampled(path: str | os.PathLike[str], sample: int, chunk: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(n for _, n in sample_chunks(_data_ranges(fd, os.fstat(fd).st_size), sample, chunk))
    finally:
        os.close(fd)


def _store(path: str | os.PathLike[str], rate: float) -> None:
    target = cache_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".disk-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"read_bytes_per_s": rate, "file": str(Path(path).absolute()), "when": time.time()}, f)
        os.replace(tmp, target)
    except OSError:  # a read-only home: the rate is used, not cached
        return
