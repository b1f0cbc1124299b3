"""Atomic writes of files and directories: a crash leaves the old version or the new one.

Files: write a sibling temporary file, flush + fsync it, ``os.replace`` it over the target,
then fsync the folder so the rename itself is durable.

Directories (``rename(2)`` cannot replace a non-empty directory, so a swap takes three
renames). The protocol for a target ``dir/name``:

1. Write everything into the sibling ``dir/.name.tmp-<pid>-<random>``; fsync every file
   and the temporary directory.
2. If ``dir/name`` exists, rename it to the backup ``dir/.name.backup`` (a stale backup
   from an earlier crash is deleted first: it is obsolete while ``dir/name`` exists).
3. Rename the temporary directory to ``dir/name``; fsync ``dir``.
4. Delete the backup.

A kill between steps 2 and 3 leaves no ``dir/name`` but a complete ``dir/.name.backup``;
:func:`recover_directory` (called by the next :func:`atomic_directory` on that path and by
readers such as :func:`lema.adapters.checkpoints.store.read_checkpoint`) renames it back. A
kill at any other point leaves ``dir/name`` complete (old or new).

Temporary files and directories are created as an ordinary ``open`` / ``mkdir`` would
create them, so they get the process's umask (``tempfile.mkstemp`` / ``mkdtemp`` would
make them 0600 / 0700): an adapter or model file is as readable to a colleague or a
serving process as any other file the user writes (0644 / 0755 under umask 0022).

Temporary files and directories carry the writer's pid (``.name.tmp-<pid>-<random>``), so
what a killed writer left behind is recognisable: :func:`clean_stale_temps` removes those
whose process is gone (every write to a path calls it for that path first, and ``lema
train`` for its whole run folder), and never touches a live writer's.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

# ``.name.tmp-<pid>-<random>``; older versions wrote ``.name.tmp-<random>`` (no pid).
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<pid>\d+)-)?[a-z0-9_]+$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours included)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def temp_prefix(path: str | os.PathLike[str]) -> str:
    """The name prefix of this process's temporary siblings of ``path``."""
    return f".{Path(path).name}.tmp-{os.getpid()}-"


def clean_stale_temps(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete the temporary files and directories that killed writers left in ``folder``.

    Only entries named like this module's temporaries (``.X.tmp-<pid>-<random>``, or the
    pid-less form of older versions) whose writer process no longer exists are removed.

    Args:
        folder: where to look (a missing folder holds nothing).
        name: only the temporaries of the target ``folder/name``; None: all of them.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        if m["pid"] is not None and pid_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _temp_name(path: Path) -> Path:
    return path.parent / f"{temp_prefix(path)}{secrets.token_hex(5)}"


def make_temp_file(path: str | os.PathLike[str]) -> tuple[int, Path]:
    """Create (``O_EXCL``) a temporary sibling of ``path``, mode 0666 less the umask; returns
    its descriptor (open for writing) and path."""
    path = Path(path)
    for _ in range(100):
        tmp = _temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def make_temp_dir(path: str | os.PathLike[str]) -> Path:
    """Create a temporary sibling folder of ``path``, mode 0777 less the umask."""
    path = Path(path)
    for _ in range(100):
        tmp = _temp_name(path)
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames inside it survive a power cut (no-op on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary binary file that replaces ``path`` only if the block succeeds.

    Example:
        >>> with atomic_file(tmp / "weights.bin") as f:  # doctest: +SKIP
        ...     f.write(b"...")

    On an exception the temporary file is deleted and ``path`` is left untouched.
    """
    path = Path(path)
    clean_stale_temps(path.parent, path.name)
    fd, tmp = make_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename)."""
    atomic_write_bytes(path, text.encode(encoding))


def backup_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`atomic_directory` parks the old directory during the swap."""
    path = Path(path)
    return path.parent / f".{path.name}.backup"


def recover_directory(path: str | os.PathLike[str]) -> bool:
    """Finish an interrupted directory swap: restore the backup if ``path`` is missing.

    Returns:
        True if a backup was restored.
    """
    path = Path(path)
    backup = backup_path(path)
    if not path.exists() and backup.is_dir():
        os.replace(backup, path)
        fsync_dir(path.parent)
        return True
    return False


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it; elsewhere set and
    put back at once."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    # Some writers create their files 0600 whatever the umask (safetensors' save_file does):
    # every file of the new directory gets the mode an ordinary open() would have given it.
    mode = 0o666 & ~current_umask()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                if os.fstat(fd).st_mode & 0o777 != mode:
                    os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` as a whole if the block succeeds.

    Example:
        >>> with atomic_directory(tmp / "ckpt") as d:  # doctest: +SKIP
        ...     (d / "a.json").write_text("{}")

    See the module docstring for the crash-safety protocol. On an exception the temporary
    directory is deleted and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    clean_stale_temps(path.parent, path.name)
    tmp = make_temp_dir(path)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = backup_path(path)
    if path.exists():
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(path, backup)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(backup, ignore_errors=True)
