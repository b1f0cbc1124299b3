"""The drive's sustained read rate, measured on the model's own file and cached per drive.

A short sample overstates what a drive sustains: a virtual disk read 1.5 GiB/s over 256 MiB
but 0.9-1.3 GiB/s over 31 GiB, and a step of a model larger than the page cache reads
gigabytes. So :func:`measure` reads *enough* of the model's own file: pieces of 8 MiB (the
run's request size) spread over the whole file, by as many threads as the run reads with,
through the page cache as the run reads (with the kernel's readahead), the pieces' pages
dropped with ``posix_fadvise(DONTNEED)`` before and after so they come from the drive (not
``O_DIRECT``: it measures another workload, half the run's rate on this project's virtual
disk), for at most ``sample``
bytes (24 GiB) or ``seconds`` (15 s), stopping early once the rate is stable (the last four
windows of 256 MiB within 5% of their mean, after at least 10 s). The rate reported is the
second half's (what the drive sustains once any burst allowance is spent). Holes of a
sparse file (zeros read without touching the drive) are skipped; a file with no data to
sample, or whose pages cannot be dropped, gives None.

:func:`read_rate` returns the cached rate of the drive holding the file when there is one
(``$LEMA_CACHE``, default ``~/.cache/lema``, ``/calibration/disk-<machine>-<device>.json``,
written atomically), else measures and caches it. A run that streamed a whole step from the
drive records the rate it saw there (:func:`store_run_rate`), which then wins over the
calibration: it is the rate of this workload, over a whole step. Rates cached by earlier
versions from a short sample are ignored (measured again).

Limit: a drive whose rate falls only after more than ``sample`` bytes (burst credits of a
cloud volume larger than 24 GiB) is still overstated by the calibration; the first full step
from disk corrects it (the progress line's prediction, and every later plan).

Torch-free: ``lema plan --calibrate`` measures with it.

Example:
    >>> read_rate("/models/llama.safetensors")           # doctest: +SKIP
    (1.1e9, 'measured: 16.0 GiB in 14.6 s, buffered, pages dropped, 4 threads')
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs

CHUNK = 32 << 20  # bytes per sampled spot of the file
PIECE = 8 << 20  # bytes per request: the run's (parallel_read.READ_PIECE)
SAMPLE = 24 << 30  # bytes read at most
SECONDS = 15.0  # seconds spent at most
MIN_SECONDS = 10.0  # before a stable rate may stop the measurement (a 4 s sample of a virtual
# disk read 2.2 GiB/s where the run's steps read at 1.4-1.8: docs/benchmarks.md 15)
WINDOW = 256 << 20  # bytes per rate window
STABLE = 0.05  # the last windows within this share of their mean: stable
THREADS = 4  # requests in flight, as a streamed run from the drive keeps (bootstrap.disk_readers)
ALIGN = 1 << 20
METHODS = ("sustained", "run")  # cached rates that stand for the drive (not the old short samples)


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


@attrs.frozen
class Sample:
    """One measurement of the drive.

    Attributes:
        rate: bytes/s over the second half of the bytes read (the sustained rate).
        bytes_read: bytes read in all.
        seconds: how long it took.
        threads: requests in flight.
        stopped: ``"stable"``, ``"time"`` (``seconds`` spent), ``"sample"`` (``sample``
            bytes read) or ``"file"`` (the whole of the file's data read).
    """

    rate: float
    bytes_read: int
    seconds: float
    threads: int
    stopped: str

    def describe(self) -> str:
        return (f"{self.bytes_read / (1 << 30):.1f} GiB in {self.seconds:.1f} s, "
                f"buffered, pages dropped, {self.threads} threads, "
                f"stopped: {self.stopped}")


def _open(path: str | os.PathLike[str]) -> int:
    # Buffered, as the run reads (parallel_read: through the page cache, with the kernel's
    # readahead), the pieces' pages dropped before and after. O_DIRECT measures another
    # workload: on this project's virtual disk it read 0.99 GiB/s where the run's own reads
    # of the same file went at 1.7-1.85 GiB/s (docs/benchmarks.md 15).
    return os.open(path, os.O_RDONLY)


def measure(path: str | os.PathLike[str], sample: int = SAMPLE, threads: int = THREADS, chunk: int = CHUNK,
            seconds: float = SECONDS, min_seconds: float = MIN_SECONDS, window: int = WINDOW) -> Sample | None:
    """Read the file as a streamed run does, from the drive (pages dropped), until the rate is
    stable or ``sample`` bytes / ``seconds`` are spent; None when nothing could be read from
    the drive (a sparse file, pages that do not drop)."""
    fd = _open(path)
    buffers: list[mmap.mmap] = []
    local = threading.local()
    try:
        chunks = sample_chunks(_data_ranges(fd, os.fstat(fd).st_size), sample, chunk)
        pieces = [(off + p, min(PIECE, n - p)) for off, n in chunks for p in range(0, n, PIECE)]
        if not pieces:
            return None
        for off, n in chunks:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)

        def read(off: int, n: int) -> int:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = mmap.mmap(-1, PIECE)  # page-aligned
                buffers.append(buf)
            view = memoryview(buf)[:n]
            try:
                done = 0
                while done < n:
                    got = os.preadv(fd, [view[done:]], off + done)
                    if got <= 0:
                        raise OSError(f"{path}: short read at byte {off + done}")
                    done += got
            finally:
                view.release()
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)  # behind the read, as the run's policy does
            return n

        marks = [(0.0, 0)]  # (seconds, bytes) after each piece, in completion order
        stopped = "file" if len(pieces) * PIECE < sample else "sample"
        start = time.perf_counter()
        with ThreadPoolExecutor(threads, thread_name_prefix="lema-disk-rate") as pool:
            futures = [pool.submit(read, off, n) for off, n in pieces]
            total = 0
            for future in futures:
                total += future.result()
                now = time.perf_counter() - start
                marks.append((now, total))
                if now >= seconds:
                    stopped = "time"
                elif now >= min_seconds and _stable(marks, window):
                    stopped = "stable"
                else:
                    continue
                for f in futures:
                    f.cancel()
                break
        elapsed = time.perf_counter() - start
        for off, n in chunks:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        rate = total / elapsed if elapsed > 0 else 0.0
        half = next(m for m in marks if m[1] >= total / 2)
        # The second half's rate, once there are enough pieces for it to mean something (with
        # few, they finish together and the half's time is noise).
        if len(marks) - 1 >= 8 * threads and marks[-1][0] > half[0]:
            rate = (total - half[1]) / (marks[-1][0] - half[0])
        # Faster than any drive: the pages stayed cached (mapped elsewhere), not a disk rate.
        if rate <= 0 or rate > 64e9:
            return None
        return Sample(rate, total, elapsed, threads, stopped)
    finally:
        os.close(fd)
        for buf in buffers:
            buf.close()


def _stable(marks: list[tuple[float, int]], window: int, count: int = 4) -> bool:
    """The last ``count`` windows of ``window`` bytes read at rates within :data:`STABLE` of their mean."""
    total = marks[-1][1]
    if total < window * (count + 1):
        return False
    rates = []
    for k in range(count):
        hi, lo = total - k * window, total - (k + 1) * window
        t_hi = next(t for t, b in reversed(marks) if b <= hi)
        t_lo = next(t for t, b in reversed(marks) if b <= lo)
        if t_hi <= t_lo:
            return False
        rates.append(window / (t_hi - t_lo))
    mean = sum(rates) / len(rates)
    return all(abs(r - mean) <= STABLE * mean for r in rates)


def measure_read_rate(path: str | os.PathLike[str], sample: int = SAMPLE, threads: int = THREADS,
                      chunk: int = CHUNK, seconds: float = SECONDS) -> float | None:
    """The sustained bytes/s of :func:`measure`, or None."""
    got = measure(path, sample, threads, chunk, seconds)
    return None if got is None else got.rate


def _cached(path: str | os.PathLike[str]) -> dict | None:
    try:
        data = json.loads(cache_path(path).read_text())
        rate = float(data["read_bytes_per_s"])
    except (OSError, ValueError, KeyError, TypeError):  # no cache, or a damaged one: a miss
        return None
    return data if rate > 0 and data.get("method") in METHODS else None


def cached_read_rate(path: str | os.PathLike[str]) -> float | None:
    """The cached read rate of the drive holding ``path`` (a sustained calibration, or the rate
    a run saw over a whole step), or None."""
    data = _cached(path)
    return None if data is None else float(data["read_bytes_per_s"])


def cached_source(path: str | os.PathLike[str]) -> str:
    """Where the cached rate comes from, for the plan's line."""
    data = _cached(path) or {}
    how = "a run's step from disk" if data.get("method") == "run" else "sustained calibration"
    return f"cached ({how}): {cache_path(path)}"


def read_rate(path: str | os.PathLike[str], sample: int = SAMPLE, chunk: int = CHUNK,
              seconds: float = SECONDS, refresh: bool = False) -> tuple[float, str] | None:
    """``(bytes/s, where it comes from)`` for the drive holding ``path``: cached (unless
    ``refresh``), else measured (:func:`measure`) and cached; None when it cannot be measured
    (a sparse file, pages that do not drop)."""
    if not refresh:
        cached = cached_read_rate(path)
        if cached is not None:
            return cached, cached_source(path)
    got = measure(path, sample, chunk=chunk, seconds=seconds)
    if got is None:
        return None
    # A file too small for the sample gives a rate, not a calibration of the drive.
    if got.stopped in ("stable", "time") or got.bytes_read >= sample // 2:
        _store(path, {"read_bytes_per_s": got.rate, "method": "sustained", "bytes": got.bytes_read,
                      "seconds": got.seconds, "threads": got.threads})
    return got.rate, f"measured: {got.describe()}"


def store_run_rate(path: str | os.PathLike[str], rate: float, nbytes: int, seconds: float) -> None:
    """Cache the rate a run saw reading ``nbytes`` of ``path`` from the drive in ``seconds``
    (a whole step): the next plan on this drive uses it."""
    if rate > 0:
        _store(path, {"read_bytes_per_s": rate, "method": "run", "bytes": nbytes, "seconds": seconds})


def _store(path: str | os.PathLike[str], record: dict) -> None:
    target = cache_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".disk-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({**record, "file": str(Path(path).absolute()), "when": time.time()}, f)
        os.replace(tmp, target)
    except OSError:  # a read-only home: the rate is used, not cached
        return


def process_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (``/proc/self/io`` ``read_bytes``:
    the drive's, not the page cache's), or None where the kernel does not count them."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None
