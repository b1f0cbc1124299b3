"""read_header: a header is valid, or one ModelFormatError naming what is wrong (never another exception)."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lema.adapters.weights.safetensors_header import read_header
from lema.errors import ModelFormatError

BAD = settings.get_profile("bad-inputs")
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1}


def write(content: bytes) -> Path:
    folder = Path(tempfile.mkdtemp())
    path = folder / "model.safetensors"
    path.write_bytes(content)
    return path


def encode(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# A valid file: tensors laid out one after another, with their data.
tensor_shapes = st.lists(st.tuples(st.sampled_from(sorted(SIZES)), st.lists(st.integers(0, 4), max_size=3)),
                         min_size=1, max_size=6)


def layout(shapes: list) -> tuple[dict, bytes]:
    header, offset = {}, 0
    for i, (dtype, shape) in enumerate(shapes):
        n = math.prod(shape) * SIZES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return header, bytes(offset)


@BAD
@given(tensor_shapes)
def test_a_valid_layout_reads_back_every_tensor_inside_the_file(shapes):
    header, data = layout(shapes)
    path = write(encode(header, data))
    tensors = read_header(path).tensors
    assert set(tensors) == set(header)
    size = path.stat().st_size
    for name, entry in tensors.items():
        n = math.prod(entry["shape"]) * SIZES[entry["dtype"]]
        assert entry["start"] + n <= size


@BAD
@given(st.binary(max_size=300))
def test_any_bytes_are_a_header_or_one_model_format_error(content):
    """Property: arbitrary bytes never raise anything but ModelFormatError naming the file."""
    path = write(content)
    try:
        read_header(path)
    except ModelFormatError as exc:
        assert str(exc).startswith(f"{path}: ")


@BAD
@given(tensor_shapes, st.data())
def test_a_field_of_the_wrong_type_names_the_tensor(shapes, data):
    """Property: a dtype, shape or offsets value of the wrong type is a malformed entry, by name."""
    header, raw = layout(shapes)
    name = data.draw(st.sampled_from(sorted(header)))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    wrong = data.draw(st.none() | st.booleans() | st.text(max_size=3) | st.floats() | st.integers()
                      | st.lists(st.text(max_size=2), min_size=1, max_size=2))
    header[name] = {**header[name], field: wrong}
    with pytest.raises(ModelFormatError, match=rf"tensor '{name}' has a malformed entry"):
        read_header(write(encode(header, raw)))


@BAD
@given(tensor_shapes, st.data())
def test_overlapping_tensors_are_refused_by_name(shapes, data):
    """Property: moving one tensor's bytes into another's range is refused naming both."""
    header, raw = layout(shapes)
    sized = [n for n, e in header.items() if e["data_offsets"][1] > e["data_offsets"][0]]
    assume(len(sized) >= 2)
    a, b = data.draw(st.lists(st.sampled_from(sized), min_size=2, max_size=2, unique=True))
    length = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    begin = min(header[a]["data_offsets"][0], len(raw) - length)  # over a's first byte, inside the file
    header[b] = {**header[b], "data_offsets": [begin, begin + length]}
    with pytest.raises(ModelFormatError, match=r"overlap"):
        read_header(write(encode(header, raw)))


@BAD
@given(tensor_shapes, st.integers(1, 1 << 40))
def test_a_tensor_past_the_end_of_the_file_is_refused(shapes, shift):
    header, raw = layout(shapes)
    name = next(reversed(header))
    begin, end = header[name]["data_offsets"]
    header[name] = {**header[name], "data_offsets": [begin + shift, end + shift]}
    assume(end > begin)
    with pytest.raises(ModelFormatError, match="runs past the end of the file"):
        read_header(write(encode(header, raw)))


@BAD
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_any_length_field_is_checked_against_the_file(length, payload):
    path = write(struct.pack("<Q", length) + payload)
    try:
        read_header(path)
    except ModelFormatError as exc:
        assert "not a valid safetensors file" in str(exc)


def test_zero_sized_tensors_may_share_an_offset():
    header = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "c": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}}
    assert set(read_header(write(encode(header, bytes(4)))).tensors) == {"a", "b", "c"}


def test_more_tensors_than_any_model_is_refused_before_parsing():
    raw = b"{" + b",".join(b'"t%d":{}' % i for i in range(300_000)) + b"}"
    with pytest.raises(ModelFormatError, match="more than 262,144 tensors"):
        read_header(write(struct.pack("<Q", len(raw)) + raw))
