"""Sharded models: the ``*.index.json`` weight map, and every shard it names, kept inside the folder.

An index maps tensor names to shard file names. A shard name must be a plain file name in
the index's folder: ``../../x``, an absolute path, a number, or a symlink that leads out of
the folder is refused, so an index can never make LEMA read (or ``lema convert`` copy) a
file outside the model. The one symlink layout allowed out is the Hugging Face cache's,
where ``snapshots/<revision>/<file>`` links to ``../../blobs/<hash>`` of the same repo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lema.adapters.json_files import read_json_object
from lema.adapters.weights.safetensors_header import read_header
from lema.errors import ModelFormatError


def read_weight_map(index: str | os.PathLike[str]) -> dict[str, str]:
    """The ``weight_map`` of an index file, every shard checked to be a file in its folder.

    Raises:
        ModelFormatError: the index is not JSON, has no ``weight_map`` object, names a shard
            that is not a plain file name, leads outside the folder, or is missing.
    """
    index = Path(index)
    data = read_json_object(index, "index", ModelFormatError, fix="re-download the model")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{index}: not a valid index: it needs a non-empty \"weight_map\" object "
                               "(tensor name -> shard file); re-download the model")
    for shard in sorted({repr(v): v for v in weight_map.values()}.values(), key=repr):
        shard_path(index, shard)
    return weight_map


def shard_path(index: Path, shard: Any) -> Path:
    """The file a shard name stands for, checked to be a file inside the index's folder."""
    folder = index.parent
    if not isinstance(shard, str) or not shard or shard in (".", "..") or Path(shard).name != shard \
            or "\\" in shard or "\x00" in shard:
        raise ModelFormatError(f"{index}: shard {shard!r} is not a file name in the model folder; an index "
                               "may only name files beside it; the index is corrupt or not for this folder")
    path = folder / shard
    if not path.is_file():
        raise ModelFormatError(f"{folder}: shard {shard} named by {index.name} is missing or not a file; "
                               "re-download the model")
    if path.is_symlink() and not _inside(path.resolve(), _allowed_roots(folder)):
        raise ModelFormatError(f"{index}: shard {shard} is a link to {path.resolve()}, outside the model folder; "
                               "copy the file into the folder instead of linking it")
    return path


def _allowed_roots(folder: Path) -> list[Path]:
    roots = [folder.resolve()]
    # The Hugging Face cache: models--org--name/snapshots/<revision>/file -> ../../blobs/<hash>.
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def read_sharded(index_path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Read every shard named by a ``model.safetensors.index.json``.

    Returns:
        (tensors, metadata): all shards' tensors merged (``file`` relative to the index's
        folder) and the first shard's metadata.

    Raises:
        ModelFormatError: as :func:`read_weight_map` and
            :func:`~lema.adapters.weights.safetensors_header.read_header`, or tensors the
            index names that no shard holds.
    """
    index_path = Path(index_path)
    weight_map = read_weight_map(index_path)
    tensors: dict[str, dict[str, Any]] = {}
    metadata: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        header = read_header(index_path.parent / shard, relative_to=index_path.parent)
        metadata = metadata or header.metadata
        tensors.update(header.tensors)
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ModelFormatError(f"{index_path}: {len(missing)} tensors in the index are in no shard, e.g. {missing[0]}")
    return tensors, metadata
