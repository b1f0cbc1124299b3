"""SafetensorsSource: stream units from one safetensors file or a sharded folder.

Two ways to fill a caller's staging buffer:

* ``method="pread"`` (default): positional reads (``os.preadv``) straight into the buffer.
  A unit's file-contiguous runs are cut into pieces of at most :data:`~lema.adapters.weights.parallel_read.READ_PIECE` bytes
  and read by a small pool of threads (``readers``), so a page-cached file streams at
  several cores' memcpy speed and an NVMe drive sees a queue of requests, not one. Each
  byte is read once, straight into the caller's buffer. Positional reads share no file
  position, so they need no lock.
* ``method="mmap"``: a ``memcpy`` out of a mapping of the file; page faults make its speed
  bimodal, so it is kept for comparison (``benchmarks/stream_bench.py``).

Without a buffer, :meth:`SafetensorsSource.read_unit` returns zero-copy tensors backed by
a read-only shared mapping of the file: nothing is read until touched, the whole model is
never loaded, and nothing is charged per model byte against the machine's commit limit (a
private, writable mapping is, so a file larger than RAM could not even be mapped). The
pages belong to the page cache, which the kernel drops and re-reads as it needs: a model
larger than RAM streams from the drive. The tensors are handed to the compute, which never
writes its weights; a stray write faults instead of reaching the file.

Example:
    >>> src = SafetensorsSource(spec, "/models/tiny")          # doctest: +SKIP
    >>> layer = src.read_unit(1)["self_attn.q_proj.weight"]     # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lema.adapters.weights import file_lease
from lema.adapters.weights.parallel_read import ParallelReader, pread_full
from lema.domain.plan.disk_time import IN_FLIGHT
from lema.domain.model.finite import check_unit_finite
from lema.domain.model.spec import ModelSpec, TensorSpec, torch_dtype
from lema.domain.schedule.slot_layout import unit_buffer_bytes, unit_layout, unit_views
from lema.errors import ConfigError, ModelFormatError

Method = Literal["pread", "mmap"]


def byte_view(buffer: torch.Tensor, offset: int, nbytes: int) -> memoryview:
    """A writable memoryview of ``nbytes`` of a contiguous CPU tensor, starting at byte ``offset``."""
    if buffer.device.type != "cpu" or not buffer.is_contiguous():
        raise ConfigError("buffer: must be a contiguous CPU tensor")
    total = buffer.numel() * buffer.element_size()
    if offset < 0 or offset + nbytes > total:
        raise ConfigError(f"buffer: {total} bytes, too small for bytes {offset}..{offset + nbytes}")
    if nbytes == 0:
        return memoryview(bytearray(0))
    array = (ctypes.c_ubyte * nbytes).from_address(buffer.data_ptr() + offset)
    return memoryview(array).cast("B")


def read_runs(layout: tuple[tuple[TensorSpec, int], ...]) -> list[tuple[str, int, int, int]]:
    """Coalesce a unit layout into ``(file, file_start, buffer_offset, nbytes)`` reads."""
    runs: list[list] = []
    for t, offset in layout:
        last = runs[-1] if runs else None
        if last and last[0] == t.file and last[1] + last[3] == t.start and last[2] + last[3] == offset:
            last[3] += t.nbytes
        else:
            runs.append([t.file, t.start, offset, t.nbytes])
    return [tuple(r) for r in runs]  # type: ignore[misc]


class SafetensorsSource:
    """A :class:`~lema.ports.weights.WeightSource` over safetensors files.

    Args:
        spec: built from the files' headers (``TensorSpec.file`` relative to ``root``).
        root: the folder holding the file(s), or the ``.safetensors`` file itself.
        method: how :meth:`read_unit` fills a buffer: ``"pread"`` or ``"mmap"``.
        readers: threads that read one unit's pieces in parallel (``"pread"`` only; 1:
            the calling thread reads alone).
        keep_bytes: for a model that does not fit the page cache: the bytes of the file's
            pages left cached, the least recently read units' pages dropped
            (``posix_fadvise(DONTNEED)``, and ``madvise`` on the mapping) once more are read,
            so streaming the model does not evict the rest of the machine's cache; the file
            is read as sequential (larger read-ahead) and a mapped unit's pages are asked for
            (``WILLNEED``) before they are touched. None (default): the page cache is left to
            the kernel.

    Attributes:
        bytes_copied: bytes read into callers' buffers so far.
        read_seconds: wall seconds spent in those reads (with ``bytes_copied``, the read rate a
            run sees).

    Raises:
        ModelFormatError: a file the spec names is missing. ConfigError: unknown method,
            or readers < 1.
    """

    def __init__(self, spec: ModelSpec, root: str | os.PathLike[str], method: Method = "pread",
                 readers: int = 1, keep_bytes: int | None = None) -> None:
        if method not in ("pread", "mmap"):
            raise ConfigError(f"method: {method!r} must be 'pread' or 'mmap'")
        root = Path(root)
        self.spec = spec
        self.root = root.parent if root.is_file() else root
        self.method = method
        self._layouts = {u.index: unit_layout(u) for u in spec.units}
        self._runs = {i: read_runs(layout) for i, layout in self._layouts.items()}
        self._reader = ParallelReader(readers)
        self.bytes_copied = 0
        self.read_seconds = 0.0  # wall seconds spent reading units into buffers (the drive's share of a step)
        missing = [f for f in spec.files if not (self.root / f).is_file()]
        if missing:
            raise ModelFormatError(f"{self.root}: missing weight file(s) {', '.join(missing)}; "
                                   "re-download or re-convert the model")
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._maps: dict[str, _Mapping] = {}
        self._closed = False
        self._checked: set[int] = set()  # units whose weights were found finite
        if keep_bytes is not None and (isinstance(keep_bytes, bool) or keep_bytes < 0):
            raise ConfigError(f"keep_bytes: {keep_bytes!r} must be a non-negative number of bytes")
        self.keep_bytes = keep_bytes
        self._kept: OrderedDict[int, int] = OrderedDict()  # units whose pages are cached -> bytes
        self.bytes_dropped = 0

    # -- files, opened lazily and once ---------------------------------------------------

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                self._check_open()
                fd = self._fds.get(file)
                if fd is None:
                    fd = os.open(self.root / file, os.O_RDONLY)
                    if self.keep_bytes is not None and hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    self._fds[file] = fd
        return fd

    def _map(self, file: str) -> "_Mapping":
        mm = self._maps.get(file)
        if mm is None:
            fd = self._fd(file)
            with self._lock:
                mm = self._maps.get(file)
                if mm is None:
                    # A mapped file cut short under a command is named, not a SIGBUS (file_lease).
                    file_lease.hold(fd, str(self.root / file))
                    self._check_size(file, fd)
                    mm = _Mapping(fd)
                    self._maps[file] = mm
        return mm

    def _check_size(self, file: str, fd: int) -> None:
        """The file still holds every byte the header promised (checked once the lease is held)."""
        need = max((t.end for u in self.spec.units for t in u.tensors if t.file == file), default=0)
        size = os.fstat(fd).st_size
        if size < need:
            raise ModelFormatError(f"{self.root / file}: now {size} bytes, but its tensors end at byte {need}; the "
                                   "file changed on disk; restore it")

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("SafetensorsSource is closed")

    # -- reads -----------------------------------------------------------------------------

    def _pread(self, file: str, start: int, view: memoryview) -> None:
        pread_full(self._fd(file), start, view, str(self.root / file))

    def _copy_from_map(self, file: str, start: int, view: memoryview) -> None:
        mm = self._map(file)
        if start + len(view) > mm.size:
            raise ModelFormatError(f"{self.root / file}: shorter than its header says; the file is truncated")
        with memoryview(mm.mmap) as whole:
            view[:] = whole[start:start + len(view)]

    def read_into(self, index: int, buffer: torch.Tensor) -> None:
        """Write unit ``index``'s bytes into ``buffer`` (layout of :func:`unit_layout`)."""
        self._check_open()
        start = time.perf_counter()
        if self.method == "mmap":
            for file, start, offset, nbytes in self._runs[index]:
                self._copy_from_map(file, start, byte_view(buffer, offset, nbytes))
        else:
            self._reader.read([(self._fd(file), start, byte_view(buffer, offset, nbytes), str(self.root / file))
                               for file, start, offset, nbytes in self._runs[index]])
        with self._lock:
            self.bytes_copied += sum(n for _, _, _, n in self._runs[index])
            self.read_seconds += time.perf_counter() - start
        self._read_done(index)

    def host_unit(self, index: int) -> None:
        """Units are read into staging buffers: there is no page-locked copy to upload from."""
        return None

    def read_unit(self, index: int, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :meth:`lema.ports.weights.WeightSource.read_unit`."""
        if not 0 <= index < len(self.spec.units):
            raise IndexError(f"unit {index} out of range 0..{len(self.spec.units) - 1}")
        if buffer is not None:
            need = unit_buffer_bytes(self.spec.units[index])
            if buffer.dtype != torch.uint8 or buffer.numel() < need:
                raise ConfigError(f"buffer: needs a uint8 tensor of at least {need} bytes for unit {index}")
            self.read_into(index, buffer)
            return self._finite(index, unit_views(buffer, self._layouts[index]))
        self._check_open()
        self._check_length(index)
        if self.keep_bytes is not None and hasattr(os, "posix_fadvise"):
            for file, start, _, nbytes in self._runs[index]:  # the drive starts on the whole unit now
                os.posix_fadvise(self._fd(file), start, nbytes, os.POSIX_FADV_WILLNEED)
        views = self._finite(index, {t.key: self._mapped(t) for t, _ in self._layouts[index]})
        self._read_done(index)
        return views

    # -- the page cache of a model larger than it ----------------------------------------------

    IN_FLIGHT = IN_FLIGHT  # the most recently read units are never dropped: they are being computed on

    def _read_done(self, index: int) -> None:
        """Unit ``index`` was just read: drop the least recently read units' pages beyond
        ``keep_bytes`` (never the last :attr:`IN_FLIGHT` units read)."""
        if self.keep_bytes is None:
            return
        with self._lock:
            self._kept.pop(index, None)
            self._kept[index] = sum(n for _, _, _, n in self._runs[index])
            drop = []
            total = sum(self._kept.values())
            while total > self.keep_bytes and len(self._kept) > self.IN_FLIGHT:
                unit, nbytes = self._kept.popitem(last=False)
                drop.append(unit)
                total -= nbytes
        for unit in drop:
            self._drop(unit)

    def _drop(self, index: int) -> None:
        for file, start, _, nbytes in self._runs[index]:
            mm = self._maps.get(file)
            if mm is not None:  # pages mapped here are not dropped by fadvise: unmap them first
                first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
                end = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
                if end > first:
                    mm.mmap.madvise(mmap.MADV_DONTNEED, first, end - first)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd(file), start, nbytes, os.POSIX_FADV_DONTNEED)
            with self._lock:
                self.bytes_dropped += nbytes

    def _finite(self, index: int, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views``, once the unit's weights are known to hold no NaN or inf: checked the first
        time each unit is read (a float32 sum per chunk, on the reading thread), then trusted."""
        if index not in self._checked:
            check_unit_finite(self.spec, index, views)
            self._checked.add(index)
        return views

    def _check_length(self, index: int) -> None:
        """A file cut short since it was opened (replaced or truncated under a run) is refused
        by name before its mapping is touched: a mapped page past the end would be a SIGBUS."""
        ends: dict[str, tuple[int, str]] = {}
        for t, _ in self._layouts[index]:
            if t.nbytes and t.end > ends.get(t.file, (0, ""))[0]:
                ends[t.file] = (t.end, t.name)
        for file, (end, name) in ends.items():
            size = os.fstat(self._fd(file)).st_size
            if size < end:
                raise ModelFormatError(f"{self.root / file}: now {size} bytes, but {name} ends at byte {end}; the "
                                       "file changed on disk during the run; restore it and resume from the last "
                                       "checkpoint")

    def _mapped(self, t: TensorSpec) -> torch.Tensor:
        mm = self._map(t.file)
        if t.end > mm.size:
            raise ModelFormatError(f"{self.root / t.file}: {t.name} runs past the end of the file; it is truncated")
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        return mm.tensor(t.start, t.nbytes).view(torch_dtype(t.dtype)).view(t.shape)

    def read_tensor(self, t: TensorSpec) -> torch.Tensor:
        """A fresh, owned copy of one tensor (positional read; used to load into RAM)."""
        out = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        if t.nbytes:
            self._pread(t.file, t.start, byte_view(out, 0, t.nbytes))
        return out

    def close(self) -> None:
        """Close the files. Mappings are dropped, not unmapped: tensors returned without a
        buffer keep their mapping alive (``torch.frombuffer`` holds a reference to it), and
        it is unmapped with the last of them."""
        with self._lock:
            self._closed = True
        self._reader.close()
        with self._lock:
            self._maps.clear()
            for fd in self._fds.values():
                file_lease.release(fd)
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Mapping:
    """A read-only, shared mapping of a whole file, and uint8 tensors over ranges of it.

    ``mmap.ACCESS_READ`` maps the file ``PROT_READ``/``MAP_SHARED``: no commit charge, the
    pages the page cache's. ``torch.frombuffer`` would warn on (and mark as writable) a
    read-only buffer, so each tensor is made over a ctypes array at the range's address
    instead; the array keeps the mapping alive, and the mapping is unmapped with the last
    tensor over it. The weights handed out are read, never written (the compute casts or
    copies them); a write would fault (SIGSEGV), never reach the file.
    """

    def __init__(self, fd: int) -> None:
        self.mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        self.size = len(self.mmap)
        # numpy exports a read-only buffer's address without copying; ``pages`` holds the export.
        self._pages = np.frombuffer(self.mmap, dtype=np.uint8)
        self.address = int(self._pages.ctypes.data)

    def tensor(self, start: int, nbytes: int) -> torch.Tensor:
        """Bytes ``start .. start + nbytes`` of the file as a uint8 tensor (no copy)."""
        array = (ctypes.c_ubyte * nbytes).from_address(self.address + start)
        array._lema_mapping = self  # type: ignore[attr-defined]  # lives as long as the tensor
        return torch.frombuffer(array, dtype=torch.uint8)
