"""One contract, every WeightSource adapter: the same bytes for every unit, with and without a buffer."""

from __future__ import annotations

import pytest
import torch

from lema.adapters.devices.cpu import CpuDevice
from lema.adapters.weights.resident_source import ResidentSource
from lema.adapters.weights.safetensors_source import SafetensorsSource
from lema.domain.schedule.slot_layout import unit_buffer_bytes
from lema.errors import ConfigError, ModelFormatError
from tests.stream_models import write_model

ADAPTERS = ["safetensors-pread", "safetensors-pread-parallel", "safetensors-mmap", "safetensors-sharded",
            "resident-file", "resident-state-dict", "resident-pinned", "resident-shared-mapping"]


@pytest.fixture(params=ADAPTERS)
def source_and_state(request, tmp_path):
    sharded = request.param == "safetensors-sharded"
    spec, root, state = write_model(tmp_path / "model", layers=3, sharded=sharded, tied=False)
    if request.param.startswith("safetensors"):
        source = SafetensorsSource(spec, root, method="mmap" if request.param.endswith("mmap") else "pread",
                                   readers=3 if request.param.endswith("parallel") else 1)
    elif request.param == "resident-file":
        source = ResidentSource.from_safetensors(spec, root)
    elif request.param == "resident-pinned":
        source = ResidentSource.from_safetensors(spec, root, allocate=CpuDevice(pinned_host=True).pinned_buffer,
                                                 pinned=True)
    elif request.param == "resident-shared-mapping":
        source = ResidentSource.shared_from_safetensors(spec, root)
    else:
        source = ResidentSource.from_state_dict(spec, state)
    yield source, state
    source.close()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def test_every_unit_is_bit_identical_without_a_buffer(source_and_state):
    source, state = source_and_state
    dtypes = set()
    for unit in source.spec.units:
        got = source.read_unit(unit.index)
        assert set(got) == {t.key for t in unit.tensors}
        for t in unit.tensors:
            assert same(got[t.key], state[t.name]), f"unit {unit.index} {t.key}"
            dtypes.add(got[t.key].dtype)
    assert dtypes == {torch.float32, torch.bfloat16, torch.float16}


def test_every_unit_is_bit_identical_in_a_buffer_and_views_it(source_and_state):
    source, state = source_and_state
    size = max(unit_buffer_bytes(u) for u in source.spec.units)
    buffer = torch.full((size + 64,), 0xAB, dtype=torch.uint8)  # stale bytes must be overwritten
    begin, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for unit in reversed(source.spec.units):
        got = source.read_unit(unit.index, buffer)
        for t in unit.tensors:
            assert same(got[t.key], state[t.name]), f"unit {unit.index} {t.key}"
            assert begin <= got[t.key].data_ptr() < end, "result is not a view of the buffer"
            assert got[t.key].data_ptr() % 64 == begin % 64


def test_a_too_small_buffer_or_unknown_unit_is_refused(source_and_state):
    source, _ = source_and_state
    small = torch.empty(unit_buffer_bytes(source.spec.units[1]) - 1, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="at least"):
        source.read_unit(1, small)
    with pytest.raises(IndexError):
        source.read_unit(len(source.spec.units))


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared-mapping"])
def test_tied_weights_are_held_once_in_ram(tmp_path, shared):
    spec, root, state = write_model(tmp_path / "tied", layers=2, tied=True)
    source = (ResidentSource.shared_from_safetensors if shared else ResidentSource.from_safetensors)(spec, root)
    embed = source.read_unit(0)["embed_tokens.weight"]
    head = source.read_unit(spec.n_layers + 1)["lm_head.weight"]
    assert embed.data_ptr() == head.data_ptr() and same(head, state["model.embed_tokens.weight"])


def test_a_truncated_file_is_a_model_format_error(tmp_path):
    spec, root, _ = write_model(tmp_path / "cut", layers=2)
    path = root / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])
    source = SafetensorsSource(spec, root)
    buffer = torch.empty(max(unit_buffer_bytes(u) for u in spec.units), dtype=torch.uint8)
    with pytest.raises(ModelFormatError, match="truncated"):
        for unit in spec.units:
            source.read_unit(unit.index, buffer)
    source.close()


def test_zero_copy_tensors_are_backed_by_the_mapping_not_a_copy(tmp_path):
    spec, root, _ = write_model(tmp_path / "zc", layers=2)
    source = SafetensorsSource(spec, root)
    a = source.read_unit(1)["mlp.up_proj.weight"]
    b = source.read_unit(1)["mlp.up_proj.weight"]
    assert a.data_ptr() == b.data_ptr()
    source.close()  # tensors still alive keep their mapping valid
    assert torch.isfinite(a.float()).all()


def test_host_unit_is_the_sources_own_flat_copy_only_when_pinned(source_and_state):
    source, _ = source_and_state
    for unit in source.spec.units[1:]:
        host = source.host_unit(unit.index)
        if getattr(source, "pinned", False):
            buffer = torch.zeros(unit_buffer_bytes(unit), dtype=torch.uint8)
            source.read_unit(unit.index, buffer)
            assert torch.equal(host[:unit_buffer_bytes(unit)], buffer)
        else:
            assert host is None


def test_bytes_copied_counts_each_buffered_read_once(source_and_state):
    source, _ = source_and_state
    before = source.bytes_copied
    unit = source.spec.units[1]
    source.read_unit(unit.index)  # no buffer: nothing copied
    assert source.bytes_copied == before
    source.read_unit(unit.index, torch.zeros(unit_buffer_bytes(unit), dtype=torch.uint8))
    # a file source reads the tensors' bytes; a RAM source copies its flat copy, padding included
    expected = unit_buffer_bytes(unit) if isinstance(source, ResidentSource) else sum(t.nbytes for t in unit.tensors)
    assert source.bytes_copied == before + expected
