"""Sparse safetensors files: a real header (with the config in its metadata) and a hole.

``write_sparse_safetensors`` writes the 8-byte header length and the JSON header itself,
then truncates the file to its full length: a "70B" file costs a few kilobytes of disk.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterable

from lema.domain.model.spec import DTYPE_BYTES, ModelSpec, dtype_code


def model_tensors(config: dict[str, Any], dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of every stored tensor of a model (tied weights once)."""
    spec = ModelSpec.from_config(config, dtype=dtype)
    seen: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for unit in spec.units:
        for t in unit.tensors:
            seen.setdefault(t.name, (t.name, t.dtype, t.shape))
    return list(seen.values())


def header_bytes(tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
                 ) -> tuple[bytes, int]:
    """The length-prefixed header and the data size it describes."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dt, shape in tensors:
        size = math.prod(shape) * DTYPE_BYTES[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_sparse_safetensors(path: Path, config: dict[str, Any] | None, dtype: str = "F16",
                             tensors: list[tuple[str, str, tuple[int, ...]]] | None = None,
                             config_in_metadata: bool = True) -> Path:
    """Write a sparse safetensors file for ``config`` (or for explicit ``tensors``)."""
    dtype = dtype_code(dtype)
    tensors = tensors if tensors is not None else model_tensors(config or {}, dtype)
    metadata = {"format": "pt"}
    if config is not None and config_in_metadata:
        metadata["config"] = json.dumps(config)
    head, data = header_bytes(tensors, metadata)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + data)
    return path


def write_sparse_sharded(folder: Path, config: dict[str, Any], dtype: str = "F16", shards: int = 2) -> Path:
    """A Hugging Face sharded folder: config.json, index and ``shards`` sparse shard files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors(config, dtype_code(dtype))
    per = math.ceil(len(tensors) / shards)
    weight_map = {}
    for i in range(shards):
        part = tensors[i * per:(i + 1) * per]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_sparse_safetensors(folder / name, None, dtype, tensors=part)
        weight_map.update({t[0]: name for t in part})
    (folder / "config.json").write_text(json.dumps(config))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index
