"""ParallelReader: every requested byte lands where asked, whatever the threads and pieces."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.adapters.weights.parallel_read import ParallelReader, cut
from lema.errors import ConfigError, ModelFormatError


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    data = os.urandom(50_000)
    path = tmp_path_factory.mktemp("read") / "blob.bin"
    path.write_bytes(data)
    return path, data


@settings(max_examples=40, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(0, 49_000), st.integers(0, 1000)), min_size=1, max_size=6),
       threads=st.integers(1, 4), piece=st.integers(1, 700))
def test_reads_equal_the_file_bytes(data_file, ranges, threads, piece):
    path, data = data_file
    fd = os.open(path, os.O_RDONLY)
    reader = ParallelReader(threads, piece=piece)
    try:
        buffers = [bytearray(n) for _, n in ranges]
        reader.read([(fd, start, memoryview(b), str(path)) for (start, _), b in zip(ranges, buffers)])
        assert [bytes(b) for b in buffers] == [data[s:s + n] for s, n in ranges]
    finally:
        reader.close()
        os.close(fd)


@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=5), piece=st.integers(1, 2000))
def test_cut_covers_each_request_exactly_once_in_order(sizes, piece):
    views = [memoryview(bytearray(n)) for n in sizes]
    pieces = cut([(3, 100 * i, v, "f") for i, v in enumerate(views)], piece)
    assert all(0 < len(p[2]) <= piece for p in pieces)
    for i, n in enumerate(sizes):
        mine = [p for p in pieces if p[1] >= 100 * i and p[1] < 100 * i + max(n, 1) and p[2].obj is views[i].obj]
        assert sum(len(p[2]) for p in mine) == n


@given(start=st.integers(0, 10_000), n=st.integers(1, 20_000), piece=st.sampled_from([512, 4096]))
def test_pieces_after_the_first_start_on_aligned_file_offsets(start, n, piece):
    pieces = cut([(3, start, memoryview(bytearray(n)), "f")], piece)
    assert pieces[0][1] == start and sum(len(p[2]) for p in pieces) == n
    assert all(p[1] % piece == 0 for p in pieces[1:])
    assert all(len(p[2]) == piece for p in pieces[1:-1])


def test_a_short_file_names_the_file_and_the_byte(data_file):
    path, _ = data_file
    fd = os.open(path, os.O_RDONLY)
    reader = ParallelReader(3, piece=4096)
    try:
        with pytest.raises(ModelFormatError, match=r"blob\.bin: ends at byte 50000.*truncated"):
            reader.read([(fd, 40_000, memoryview(bytearray(20_000)), str(path))])
    finally:
        reader.close()
        os.close(fd)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "4"])
def test_a_bad_thread_count_is_a_config_error(threads):
    with pytest.raises(ConfigError, match="readers"):
        ParallelReader(threads)


def test_a_closed_reader_refuses_work(data_file):
    path, _ = data_file
    reader = ParallelReader(2, piece=10)
    reader.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ConfigError, match="closed"):
            reader.read([(fd, 0, memoryview(bytearray(100)), str(path))])
    finally:
        os.close(fd)
