"""The drive's read rate (measured on the model's own file, cached per drive) and the page cache
a streamed model larger than it leaves behind (dropped beyond LEMA's share)."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from lema.adapters.weights import read_rate as rr
from lema.adapters.weights.model_files import resolve_model
from lema.adapters.weights.safetensors_source import SafetensorsSource
from tests.sparse_models import write_sparse_safetensors
from tests.streamed_steps import llama_config, write_model

_libc = ctypes.CDLL(None, use_errno=True)


def cached_fraction(path, start: int = 0, length: int | None = None) -> float:
    """The share of a file range's pages in the page cache (mincore on a fresh mapping)."""
    size = os.path.getsize(path)
    length = size - start if length is None else length
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    length += start - first
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), first + length, access=mmap.ACCESS_READ)
    try:
        pages = -(-length // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        import numpy as np

        addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data + first
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        assert _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
        return sum(v & 1 for v in vec) / pages
    finally:
        try:
            mm.close()
        except BufferError:
            pass


@pytest.fixture()
def model(tmp_path):
    """A 42 MiB model whose every byte is data (4 dense layers), flushed to the drive."""
    path = tmp_path / "m.safetensors"
    write_model(path, llama_config(4, 512, 1408, 2000, 4), "F32", dense=(0, 1, 2, 3))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return path


def test_read_rate_is_measured_on_the_file_then_cached_per_drive(tmp_path, model, monkeypatch):
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    os.posix_fadvise(os.open(model, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    rate, source = rr.read_rate(model)
    assert rate > 1e6 and source.startswith("measured: ")
    assert not rr.cache_path(model).exists()  # 42 MiB: too small a sample to stand for the drive
    rate, source = rr.read_rate(model, sample=32 << 20, chunk=4 << 20)  # a sample this file holds
    assert rr.cache_path(model).is_file() and str(tmp_path / "cache") in str(rr.cache_path(model))
    assert rr.read_rate(model) == (rate, rr.cached_source(model))
    assert "sustained calibration" in rr.cached_source(model)
    assert cached_fraction(model) < 0.5  # the sample's pages were dropped again (or never cached: O_DIRECT)


def test_the_measurement_reads_the_whole_sample_spread_in_run_sized_requests(tmp_path, model):
    got = rr.measure(model, sample=32 << 20, chunk=4 << 20, min_seconds=0.0, window=1 << 20)
    assert got is not None and got.rate > 1e6
    assert got.bytes_read <= 32 << 20 and got.stopped in ("stable", "sample", "file")
    assert got.threads == rr.THREADS and "GiB in" in got.describe()
    bounded = rr.measure(model, sample=32 << 20, chunk=4 << 20, seconds=0.0)
    assert bounded is not None and bounded.stopped == "time" and bounded.bytes_read < 32 << 20


def test_a_short_sample_cached_by_an_older_version_is_measured_again_and_a_run_rate_wins(tmp_path, model,
                                                                                      monkeypatch):
    import json

    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    target = rr.cache_path(model)
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps({"read_bytes_per_s": 1.5e9}))  # no method: a 256 MiB sample
    assert rr.cached_read_rate(model) is None
    rr.store_run_rate(model, 0.9e9, 30 << 30, 33.0)
    assert rr.cached_read_rate(model) == 0.9e9 and "a run's step from disk" in rr.cached_source(model)
    assert rr.read_rate(model) == (0.9e9, rr.cached_source(model))


def test_a_sparse_file_has_nothing_to_measure(tmp_path):
    path = write_sparse_safetensors(tmp_path / "s.safetensors", llama_config(2, 1024, 2816, 8000, 8))
    assert rr.measure_read_rate(path) is None


def test_sample_chunks_are_aligned_spread_and_inside_the_data():
    chunks = rr.sample_chunks([(100, 40 << 20), ((64 << 20) + 5, 400 << 20)], sample=4 << 20, chunk=1 << 20)
    assert len(chunks) == 4 and all(off % rr.ALIGN == 0 for off, _ in chunks)
    assert all(100 <= off and off + n <= 40 << 20 or (64 << 20) < off and off + n <= 400 << 20 for off, n in chunks)
    assert chunks[-1][0] > 64 << 20  # spread over both ranges, not the first few MiB


@pytest.mark.parametrize("buffered", [True, False])
def test_pages_beyond_the_share_kept_are_dropped_behind_the_reads(model, buffered):
    import torch

    from lema.domain.schedule.slot_layout import slot_bytes

    spec = resolve_model(str(model)).spec
    with SafetensorsSource(spec, model, keep_bytes=0) as source:
        buffer = torch.empty(slot_bytes(spec.units[1:]), dtype=torch.uint8)
        for u in spec.units:
            views = source.read_unit(u.index, buffer if buffered else None)
            if not buffered:
                for t in views.values():  # what the engine does: touch every page
                    if t.numel():
                        int(t.reshape(-1).view(torch.uint8).numpy()[::4096].sum())
            del views
        assert source.bytes_dropped > 0
        dropped = spec.units[:len(spec.units) - SafetensorsSource.IN_FLIGHT]  # the least recently read
        for u in dropped:
            for t in (t for t in u.tensors if t.nbytes >= 64 << 10):  # a norm shares its edge pages
                assert cached_fraction(model, t.start, t.nbytes) < 0.1, t.name
        last = spec.units[-1].tensors[0]
        assert cached_fraction(model, last.start, last.nbytes) > 0.9  # the units in flight stay cached


def test_keep_bytes_must_be_a_byte_count(model):
    from lema.errors import ConfigError

    with pytest.raises(ConfigError, match="keep_bytes"):
        SafetensorsSource(resolve_model(str(model)).spec, model, keep_bytes=-1)
