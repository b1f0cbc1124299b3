"""Read leases on mapped weight files: a file truncated under a run is named, not a SIGBUS.

A weight file LEMA computes on in place is memory-mapped; if another process truncates or
rewrites it during the run, the next touch of a page past the new end kills the process
with SIGBUS (no message, the run lock left behind). Where Linux allows it (the user owns
the file) and a command runs inside :func:`guarding`, :func:`hold` takes a read lease on
the mapped file: a process that then opens
the file for writing or truncates it is held back by the kernel (for up to
``/proc/sys/fs/lease-break-time`` seconds) and LEMA gets SIGIO, whose handler raises a
:class:`~lema.errors.ModelFormatError` naming the file in the main thread. The run stops
there, its mappings are dropped and the lease released when the process ends; only then
does the other process's change go through. Where no lease can be taken (another owner, a
file system without leases, not Linux) nothing changes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

from lema.errors import ModelFormatError

try:  # pragma: no cover - the constants exist on Linux only
    import fcntl

    _SETLEASE = fcntl.F_SETLEASE
    _GETLEASE = fcntl.F_GETLEASE
    _READ, _UNLOCK = fcntl.F_RDLCK, fcntl.F_UNLCK
except (ImportError, AttributeError):  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

_lock = threading.RLock()  # the SIGIO handler may run while the main thread holds it
_leases: dict[int, str] = {}  # descriptor -> the file's path, while its lease is held
_users = 0  # open guarding() blocks
_previous: Any = None


def available() -> bool:
    """Whether leases can be used here (Linux, SIGIO, called from the main thread)."""
    return (fcntl is not None and hasattr(signal, "SIGIO")
            and threading.current_thread() is threading.main_thread())


@contextlib.contextmanager
def guarding() -> Iterator[None]:
    """Within the block, mapped weight files are leased and a broken lease raises (the
    command line wraps each command in it; a library caller is never interrupted by a
    signal it did not ask for)."""
    global _users, _previous
    if not available():
        yield
        return
    with _lock:
        if _users == 0:
            _previous = signal.signal(signal.SIGIO, _on_sigio)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            last = _users == 0
        if last:
            for fd in list(_leases):
                release(fd)
            signal.signal(signal.SIGIO, _previous if _previous is not None else signal.SIG_DFL)


def hold(fd: int, path: str) -> bool:
    """Take a read lease on ``fd`` (opened read-only); False where the system refuses one."""
    if fcntl is None or _users == 0:
        return False
    try:
        fcntl.fcntl(fd, _SETLEASE, _READ)
    except OSError:  # not the owner, a writer has it open, no lease support
        return False
    with _lock:
        _leases[fd] = path
    return True


def release(fd: int) -> None:
    """Give up the lease on ``fd`` (before closing it)."""
    with _lock:
        held = _leases.pop(fd, None)
    if held is not None:
        try:
            fcntl.fcntl(fd, _SETLEASE, _UNLOCK)
        except OSError:
            pass


def _on_sigio(signum: int, frame: Any) -> None:
    with _lock:
        leased = list(_leases.items())
    broken = []
    for fd, path in leased:
        try:
            if fcntl.fcntl(fd, _GETLEASE) != _READ:
                broken.append(path)
        except OSError:
            continue
    if broken:
        raise ModelFormatError(f"{broken[0]}: another process is truncating or rewriting the file while LEMA reads "
                               "it; the run stops here (its last checkpoint is intact; the other process waits "
                               "until LEMA has exited): restore the file and resume")
    if callable(_previous):
        _previous(signum, frame)
