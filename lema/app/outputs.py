"""Where a command may write: never over or into its inputs, never over existing data
the user did not ask to replace.

Every command that writes (``convert``, ``merge``, ``train``, ``bench``, ``demo``) checks
its output here before reading or writing anything large:

* the output must not be one of the input files (compared after resolving symlinks, and
  by inode when both exist, so a hard link or a Hub-cache symlink counts);
* it must not be, or lie inside, an input *folder* (a model folder is scanned for weight
  files, so a file written into it changes what the folder is);
* an output that replaces a folder as a whole must not contain an input;
* an existing non-empty output is refused unless ``overwrite`` (``--overwrite``).

Example:
    >>> check_output("merged", option="--out", folders=["base"], overwrite=False)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from lema.errors import OutputError

def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _same(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def is_nonempty(path: str | os.PathLike[str], ignore: Iterable[str] = ()) -> bool:
    """A file with bytes, or a folder with an entry not named in ``ignore``."""
    p = Path(path)
    if p.is_dir():
        skip = set(ignore)
        return any(e.name not in skip for e in p.iterdir())
    try:
        return p.stat().st_size > 0
    except FileNotFoundError:
        return False


def folder_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files directly in ``folder`` (what a model or adapter folder is read from)."""
    p = Path(folder)
    return [e for e in p.iterdir() if e.is_file()] if p.is_dir() else []


def check_output(out: str | os.PathLike[str], *, option: str,
                 files: Iterable[str | os.PathLike[str] | None] = (),
                 folders: Iterable[str | os.PathLike[str] | None] = (),
                 overwrite: bool | None = False, replaces_folder: bool = False,
                 flag: str = "--overwrite") -> None:
    """Refuse an output that would damage an input or existing data.

    Args:
        out: the output file or folder.
        option: how the user named it (``"--out"``, ``"OUT"``), for the message.
        files: input files (None entries are skipped).
        folders: input folders: the output may be neither one of them nor inside one.
        overwrite: allow replacing an existing non-empty output; None skips that check
            (the caller applies its own rule, e.g. ``lema train --resume``).
        replaces_folder: the output folder is replaced as a whole (an input inside it would
            be deleted).
        flag: the option that allows overwriting, named in the message.

    Raises:
        OutputError: with what is wrong and what to do.
    """
    target = _real(out)
    for folder in (f for f in folders if f is not None):
        where = _real(folder)
        if target == where:
            raise OutputError(f"{option} {out} is the input folder {folder}; writing there would change or "
                              "destroy the input: choose another path")
        if _inside(target, where):
            raise OutputError(f"{option} {out} lies inside the input folder {folder}; LEMA never writes into "
                              "its inputs: choose a path outside it")
    inputs = [f for f in files if f is not None]
    for file in inputs:
        if _same(out, file):
            kind = "folder" if Path(file).is_dir() else "file"
            raise OutputError(f"{option} {out} is the input {kind} {file}; writing it would destroy the input: "
                              "choose another path")
    if replaces_folder:
        for item in [*inputs, *(f for f in folders if f is not None)]:
            if _inside(_real(item), target):
                raise OutputError(f"{option} {out} contains the input {item}; replacing it would delete the "
                                  "input: choose another path")
    if overwrite is False and is_nonempty(out):
        kind = "folder" if Path(out).is_dir() else "file"
        raise OutputError(f"{option} {out}: the {kind} already exists and is not empty; pass {flag} to "
                          "replace it, or choose another path")
