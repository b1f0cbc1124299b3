"""Positional reads of file ranges into memory, by a small pool of threads.

``os.preadv`` releases the GIL and shares no file position, so several threads can fill
one buffer from one file at once: from the page cache that is several cores' memcpy
speed, from an NVMe drive a queue of requests instead of one. Every byte is read once,
straight into the caller's memory.

Example:
    >>> reader = ParallelReader(threads=4)                             # doctest: +SKIP
    >>> reader.read([(fd, 0, memoryview(buffer), "model.safetensors")])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from lema.errors import ConfigError, ModelFormatError

# Linux moves at most 0x7ffff000 bytes per read call; larger requests loop.
_MAX_READ = 0x7FFFF000
# Pieces a request is cut into for the threads: large enough that a call's overhead
# vanishes, small enough that a 100 MB layer keeps every thread busy.
READ_PIECE = 8 << 20


def pread_full(fd: int, start: int, view: memoryview, what: str = "file") -> None:
    """Fill ``view`` from ``fd`` at byte ``start``; ModelFormatError if the file ends first."""
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:done + min(n - done, _MAX_READ)]], start + done)
        if got <= 0:
            raise ModelFormatError(f"{what}: ends at byte {start + done}, header says {start + n}; the file is "
                                   "truncated")
        done += got


Request = tuple[int, int, memoryview, str]  # (fd, file offset, destination, the file's name)


def cut(requests: Sequence[Request], piece: int = READ_PIECE) -> list[Request]:
    """Cut ``(fd, start, view, name)`` requests into pieces of at most ``piece`` bytes (in order).

    The cuts fall on file offsets that are multiples of ``piece``: every piece but a
    request's first and last is one aligned ``piece``-sized request to the drive (whole
    pages and whole blocks, which a drive serves at its full rate)."""
    out = []
    for fd, start, view, name in requests:
        done = 0
        while done < len(view):
            at = start + done
            n = min(len(view) - done, piece - at % piece)
            out.append((fd, at, view[done:done + n], name))
            done += n
    return out


class ParallelReader:
    """Reads ``(fd, start, view, name)`` requests with ``threads`` threads (1: the caller reads).

    Raises:
        ConfigError: threads < 1.
    """

    def __init__(self, threads: int = 1, piece: int = READ_PIECE) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"readers: {threads!r} must be a positive number of threads")
        self.threads = threads
        self.piece = piece
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def read(self, requests: Sequence[Request]) -> None:
        """Fill every view; returns once all are filled (or raises the first error, after
        every piece has stopped, so no thread writes the buffers behind the caller's back)."""
        pieces = cut(requests, self.piece) if self.threads > 1 else list(requests)
        if len(pieces) <= 1 or self.threads == 1:
            for fd, start, view, name in pieces:
                pread_full(fd, start, view, name)
            return
        futures = [self._get_pool().submit(pread_full, fd, start, view, name) for fd, start, view, name in pieces]
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def _get_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise ConfigError("the reader is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lema-read")
            return self._pool

    def close(self) -> None:
        """Stop the threads (after the reads in flight)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
