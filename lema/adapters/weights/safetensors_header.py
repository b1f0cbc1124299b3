"""Read safetensors headers (never the weights) and check them against the file.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(tensor name -> dtype, shape, data_offsets relative to the end of the header, plus an
optional ``__metadata__`` dict of strings), then the tensor data.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

import attrs

from lema.domain.json_values import JsonValueError, parse_json
from lema.domain.model.spec import DTYPE_BYTES
from lema.errors import ModelFormatError

# The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# More tensors than any model LEMA reads (4,096 layers of ~12): bounds the parsed header's RAM.
MAX_HEADER_TENSORS = 262_144


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

    Every tensor's dtype and shape must be well formed and its byte range must lie inside
    the file, match the dtype and shape, and overlap no other tensor's range.

    Args:
        path: the ``.safetensors`` file.
        relative_to: folder the tensors' ``file`` field is made relative to (default: the
            file's own folder, so ``file`` is the bare file name).

    Raises:
        ModelFormatError: the file is missing, empty, truncated, not safetensors, or its
            header describes tensors that are malformed, overlap, or run past the end of
            the file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise ModelFormatError(f"{path}: is not a file, expected a .safetensors file")
    size = path.stat().st_size
    where = f"{path}: not a valid safetensors file"
    if size < 8:
        raise ModelFormatError(f"{where}: it is {size} bytes long, too short for a header; re-download or re-convert it")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise ModelFormatError(
                f"{where}: header length {length} is larger than the file ({size} bytes) or the 100 MiB "
                "safetensors limit; the file is truncated or not safetensors"
            )
        raw = f.read(length)
    # Bound the parsed header's memory before parsing: each tensor is one JSON object.
    if raw.count(b"{") > MAX_HEADER_TENSORS or raw.count(b",") > 8 * MAX_HEADER_TENSORS:
        raise ModelFormatError(f"{where}: the header lists more than {MAX_HEADER_TENSORS:,} tensors or values; "
                               "no model LEMA reads has that many; the file is corrupt")
    try:
        header = parse_json(raw)
    except JsonValueError as exc:
        raise ModelFormatError(f"{where}: the header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{where}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFormatError(f"{where}: __metadata__ must be an object of strings")
    data_start = 8 + length
    rel = Path(relative_to) if relative_to is not None else path.parent
    file_field = os.path.relpath(path, rel)
    tensors, problems = _tensor_entries(header, data_start, size)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelFormatError(f"{where}: {'; '.join(problems[:3])}{more}; the file is truncated or corrupt")
    for entry in tensors.values():
        entry["file"] = file_field
    return Header(path=path, tensors=tensors, metadata=dict(metadata), data_start=data_start)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entries(header: dict[str, Any], data_start: int, size: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Check every entry; returns name -> {dtype, shape, start} and the problems found."""
    tensors: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        shown = repr(entry) if len(repr(entry)) <= 80 else repr(entry)[:77] + "..."
        if not isinstance(entry, dict):
            problems.append(f"tensor {name!r} has a malformed entry {shown}")
            continue
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(dtype, str) and dtype in DTYPE_BYTES and isinstance(shape, list)
                and all(_is_count(s) for s in shape) and isinstance(offsets, list) and len(offsets) == 2
                and all(_is_count(o) for o in offsets)):
            problems.append(f"tensor {name!r} has a malformed entry {shown}")
            continue
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != expected:
            problems.append(f"tensor {name!r}: byte range {begin}..{end} does not match {dtype}{shape}")
        elif data_start + end > size:
            problems.append(f"tensor {name!r} runs past the end of the file ({data_start + end} > {size} bytes)")
        else:
            tensors[name] = {"dtype": dtype, "shape": list(shape), "start": data_start + begin}
            if end > begin:
                ranges.append((begin, end, name))
    ranges.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            problems.append(f"tensors {a!r} and {b!r} overlap (bytes {begin_b}..{end_a} belong to both)")
    return tensors, problems
