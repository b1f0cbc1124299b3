"""Write a safetensors file one tensor at a time, so peak RAM is one tensor.

The format: an 8-byte little-endian header length N, N bytes of JSON (padded with spaces
to a multiple of 8, as the safetensors library does), then the tensors' bytes back to back
in the order the header lists them. Since the header needs every name, dtype and shape up
front, the writer is given them first and then checks each tensor it is handed.

A *tail* holds small tensors whose size is known only once the others are written (a
quantized weight's JSON state, which records a mean of its scales): they are written after
every other tensor, and the header, written first with room for their largest sizes, is
rewritten at the end with their real ones and padded with spaces (as the format allows).

Example:
    >>> entries = [("a", torch.float32, (2, 3)), ("b", torch.int64, (4,))]
    >>> with open_safetensors_writer(tmp / "x.safetensors", entries, {"format": "pt"}) as w:  # doctest: +SKIP
    ...     w.write("a", torch.zeros(2, 3))
    ...     w.write("b", torch.arange(4))
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from typing import BinaryIO, Iterator, Mapping, Sequence

import torch

from lema.adapters.checkpoints.atomic import atomic_file
from lema.domain.model.spec import DTYPES, dtype_code, torch_dtype

Entry = tuple[str, "torch.dtype | str", Sequence[int]]
_CODES = {dtype: code for code, (dtype, _) in DTYPES.items()}


def code_of(dtype: torch.dtype | str) -> str:
    """The safetensors dtype code of a torch dtype (any DTYPES entry) or a dtype name."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _CODES:
            raise ValueError(f"dtype {dtype} cannot be stored in safetensors by LEMA")
        return _CODES[dtype]
    return dtype_code(dtype)


def build_header(entries: Sequence[Entry], metadata: Mapping[str, str] | None = None,
                 length: int | None = None) -> bytes:
    """The length prefix + padded JSON header for these tensors, in this order.

    Args:
        length: pad the JSON with spaces to exactly this many bytes (default: to a multiple of 8).

    Raises:
        ValueError: a repeated name, or a header longer than ``length``.
    """
    raw = _header_json(entries, metadata)
    pad = -len(raw) % 8 if length is None else length - len(raw)
    if pad < 0:
        raise ValueError(f"the header needs {len(raw)} bytes, more than the {length} reserved")
    raw += b" " * pad
    return struct.pack("<Q", len(raw)) + raw


def _header_json(entries: Sequence[Entry], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        if name in header or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} appears twice or is reserved")
        code = code_of(dtype)
        nbytes = math.prod(shape) * DTYPES[code][1]
        header[name] = {"dtype": code, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


class SafetensorsWriter:
    """Streams tensors into an open binary file after writing the header.

    Args:
        f: a binary file positioned at 0.
        entries: ``(name, dtype, shape)`` for every tensor, in file order.
        metadata: string -> string, stored as ``__metadata__``.
        tail: ``(name, dtype, largest shape)`` of 1-D tensors written with :meth:`write_tail`,
            stored after every entry (``f`` must be seekable).
    """

    def __init__(self, f: BinaryIO, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None,
                 tail: Sequence[Entry] = ()) -> None:
        self._f = f
        self._entries = [(n, torch_dtype(code_of(d)), tuple(int(s) for s in shape)) for n, d, shape in entries]
        self._next = 0
        self._metadata = metadata
        self._tail = {n: (torch_dtype(code_of(d)), tuple(int(s) for s in shape)) for n, d, shape in tail}
        self._tail_data: dict[str, torch.Tensor] = {}
        header = build_header(list(entries) + list(tail), metadata)
        self._header_bytes = len(header) - 8
        f.write(header)

    @property
    def remaining(self) -> list[str]:
        """Names still to be written, in order."""
        return [n for n, _, _ in self._entries[self._next:]]

    def write(self, name: str, tensor: torch.Tensor, *, cast: bool = False,
              device: torch.device | str | None = None, chunk_bytes: int = 16 << 20) -> None:
        """Append the next tensor; it must match the header's next entry exactly.

        Args:
            name: must be the header's next name.
            tensor: the data; its shape must match the header, and its dtype too unless
                ``cast``.
            cast: convert to the header's dtype in chunks of about ``chunk_bytes``, so the
                converted copy never exists whole (peak RAM: the tensor plus one chunk).
            device: where chunks are converted (default: where the tensor is).

        Raises:
            ValueError: wrong name (out of order), shape or dtype, or too many tensors.
        """
        if self._next >= len(self._entries):
            raise ValueError(f"tensor {name!r}: every tensor of the header is already written")
        want_name, want_dtype, want_shape = self._entries[self._next]
        if name != want_name:
            raise ValueError(f"tensor {name!r} written out of order: the header expects {want_name!r} next")
        if tuple(tensor.shape) != want_shape or (tensor.dtype != want_dtype and not cast):
            raise ValueError(f"tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, "
                             f"the header says {want_dtype}{list(want_shape)}")
        flat = tensor.detach().contiguous().reshape(-1)
        if tensor.dtype == want_dtype and device is None:
            self._write_raw(flat)
        else:
            step = max(1, chunk_bytes // max(flat.element_size(), want_dtype.itemsize))
            for i in range(0, flat.numel(), step):
                part = flat[i:i + step]
                if device is not None:
                    part = part.to(device)
                self._write_raw(part.to(want_dtype))
        self._next += 1

    def _write_raw(self, flat: torch.Tensor) -> None:
        if flat.device.type != "cpu":
            flat = flat.cpu()
        if flat.numel():
            self._f.write(memoryview(flat.view(torch.uint8).numpy()))

    def write_tail(self, name: str, tensor: torch.Tensor) -> None:
        """Keep a tail tensor (at most its declared shape, same dtype) until :meth:`finish`."""
        if name not in self._tail or name in self._tail_data:
            raise ValueError(f"tensor {name!r} is not a tail tensor of the header, or was written twice")
        dtype, largest = self._tail[name]
        if tensor.dtype != dtype or tensor.ndim != 1 or tensor.shape[0] > largest[0]:
            raise ValueError(f"tail tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, the header allows "
                             f"{dtype} of at most {list(largest)}")
        self._tail_data[name] = tensor.detach().cpu().contiguous().clone()

    def finish(self) -> None:
        """Check that every tensor of the header was written; write the tail and the final header."""
        if self._next != len(self._entries):
            missing = self.remaining
            raise ValueError(f"{len(missing)} tensors of the header were never written, e.g. {missing[0]!r}")
        if not self._tail:
            return
        missing = [n for n in self._tail if n not in self._tail_data]
        if missing:
            raise ValueError(f"{len(missing)} tail tensors were never written, e.g. {missing[0]!r}")
        for name in self._tail:
            self._write_raw(self._tail_data[name].reshape(-1))
        end = self._f.tell()
        tail = [(n, self._tail_data[n].dtype, tuple(self._tail_data[n].shape)) for n in self._tail]
        self._f.seek(0)
        self._f.write(build_header(list(self._entries) + tail, self._metadata, length=self._header_bytes))
        self._f.seek(end)


@contextlib.contextmanager
def open_safetensors_writer(path: str | os.PathLike[str], entries: Sequence[Entry],
                            metadata: Mapping[str, str] | None = None,
                            tail: Sequence[Entry] = ()) -> Iterator[SafetensorsWriter]:
    """Write ``path`` atomically, tensor by tensor (``tail``: see :class:`SafetensorsWriter`).

    The file appears at ``path`` only when the block ends without an exception and every
    tensor was written; otherwise the temporary file is deleted and ``path`` is untouched.
    """
    with atomic_file(path) as f:
        writer = SafetensorsWriter(f, entries, metadata, tail)
        yield writer
        writer.finish()
