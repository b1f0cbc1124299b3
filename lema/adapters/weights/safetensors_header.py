"""Read safetensors headers (never the weights) and check them against the file.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(tensor name -> dtype, shape, data_offsets relative to the end of the header, plus an
optional ``__metadata__`` dict of strings), then the tensor data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import attrs

from lema.domain.model.spec import DTYPE_BYTES
from lema.errors import ModelFormatError

# The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@attrs.frozen
class Header:
    """The parsed header of one safetensors file.

    Attributes:
        path: the file.
        tensors: name -> {"dtype", "shape", "file", "start"} with absolute byte offsets.
        metadata: the ``__metadata__`` dict (strings), possibly empty.
        data_start: absolute offset of the first data byte.
    """

    path: Path
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data_start: int


def read_header(path: str | os.PathLike[str], relative_to: str | os.PathLike[str] | None = None) -> Header:
    """Read and validate the header of a safetensors file.

    Args:
        path: the ``.safetensors`` file.
        relative_to: folder the tensors' ``file`` field is made relative to (default: the
            file's own folder, so ``file`` is the bare file name).

    Raises:
        ModelFormatError: the file is missing, empty, truncated, not safetensors, or its
            header describes tensors that run past the end of the file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a folder, expected a .safetensors file")
    size = path.stat().st_size
    where = f"{path}: not a valid safetensors file"
    if size < 8:
        raise ModelFormatError(f"{where}: it is {size} bytes long, too short for a header; re-download or re-convert it")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise ModelFormatError(
                f"{where}: header length {length} is larger than the file ({size} bytes); "
                "the file is truncated or not safetensors"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{where}: header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelFormatError(f"{where}: __metadata__ is not a JSON object")
    data_start = 8 + length
    rel = Path(relative_to) if relative_to is not None else path.parent
    file_field = os.path.relpath(path, rel)
    tensors: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in DTYPE_BYTES or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError
            expected = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            problems.append(f"tensor {name!r} has a malformed entry {entry!r}")
            continue
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0:
            problems.append(f"tensor {name!r}: byte range {begin}..{end} does not match {dtype}{shape}")
        elif data_start + end > size:
            problems.append(f"tensor {name!r} runs past the end of the file ({data_start + end} > {size} bytes)")
        else:
            tensors[name] = {"dtype": dtype, "shape": list(shape), "file": file_field, "start": data_start + begin}
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelFormatError(f"{where}: {'; '.join(problems[:3])}{more}; the file is truncated or corrupt")
    return Header(path=path, tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()},
                  data_start=data_start)


def read_sharded(index_path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Read every shard named by a ``model.safetensors.index.json``.

    Returns:
        (tensors, metadata): all shards' tensors merged (``file`` relative to the index's
        folder) and the first shard's metadata.
    """
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"{index_path}: not a valid safetensors index (needs a weight_map object): {exc}") from None
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
