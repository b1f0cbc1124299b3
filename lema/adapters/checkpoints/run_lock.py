"""An exclusive lock on a training run folder, so two runs never write one folder.

The lock is the file ``<folder>/.lema.lock`` holding the owner's pid. Where the OS has
``flock`` (Linux, macOS) the file is also ``flock``-ed: the kernel drops that lock when
its process dies however it dies, so a lock file left by a killed run is recognised as
stale even if its pid was reused. Elsewhere the pid alone decides (a lock whose process
no longer exists is stale). A stale lock is taken over and reported; a live one is refused
with :class:`~lema.errors.RunInUseError` naming its pid.

Example:
    >>> lock, note = acquire_run_lock(tmp / "run")  # doctest: +SKIP
    >>> lock.release()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lema.adapters.checkpoints.atomic import pid_alive
from lema.errors import RunInUseError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lema.lock"


class RunLock:
    """A held lock; :meth:`release` (or the context manager) gives it back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Delete the lock file, then drop the lock (in that order: a waiting process that
        opened the old file sees it unlinked and retries on a fresh one)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def _owner(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


def _refuse(folder: Path, pid: int | None) -> RunInUseError:
    who = f"process {pid}" if pid is not None else "another process"
    return RunInUseError(f"{folder} is in use by another lema train ({who} holds {folder / LOCK_NAME}); "
                         "wait for it to finish, stop it, or choose another --out")


def acquire_run_lock(folder: str | os.PathLike[str]) -> tuple[RunLock, str | None]:
    """Lock ``folder`` (created if missing) for this process.

    Returns:
        ``(lock, note)``: ``note`` says whose stale lock was taken over, else None.

    Raises:
        RunInUseError: a live process holds the lock.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    for _ in range(100):
        if fcntl is None:  # pragma: no cover - Windows
            got = _acquire_by_pid(folder, path)
        else:
            got = _acquire_by_flock(folder, path)
        if got is not None:
            return got
    raise _refuse(folder, _owner(path))


def _stale_note(folder: Path, previous: int | None) -> str | None:
    if previous is None or previous == os.getpid():
        return None
    return f"took over a stale lock in {folder}: process {previous}, which held it, is no longer running"


def _acquire_by_flock(folder: Path, path: Path) -> tuple[RunLock, str | None] | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise _refuse(folder, pid) from None
    except OSError:
        os.close(fd)
        raise
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # released (and unlinked) by its owner between our open and flock: retry
        os.close(fd)
        return None
    note = _stale_note(folder, _read_pid(fd))
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return RunLock(path, fd), note


def _acquire_by_pid(folder: Path, path: Path) -> tuple[RunLock, str | None] | None:  # pragma: no cover
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pid = _owner(path)
        if pid is not None and pid_alive(pid):
            raise _refuse(folder, pid) from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return None
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return RunLock(path, fd), None
