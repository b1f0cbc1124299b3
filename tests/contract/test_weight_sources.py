"""One contract, every WeightSource adapter: the same bytes for every unit, with and without a buffer."""

from __future__ import annotations

import pytest
import torch

from lema.adapters.devices.cpu import CpuDevice
from lema.adapters.weights.resident_source import ResidentSource, ram_buffer
from lema.adapters.weights.safetensors_source import SafetensorsSource
from lema.adapters.weights.tiered_source import TieredSource
from lema.domain.schedule.slot_layout import unit_buffer_bytes
from lema.errors import ConfigError, ModelFormatError
from tests.stream_models import write_model

ADAPTERS = ["safetensors-pread", "safetensors-pread-parallel", "safetensors-mmap", "safetensors-sharded",
            "resident-file", "resident-state-dict", "resident-pinned", "resident-shared-mapping", "tiered",
            "tiered-pinned"]


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
    elif request.param.startswith("tiered"):  # AUTO's host tier: units 1 and 3 in RAM, the rest streamed
        pinned = request.param.endswith("pinned")
        source = TieredSource(SafetensorsSource(spec, root, readers=2, keep_bytes=0), (1, 3),
                              CpuDevice(pinned_host=True).pinned_buffer if pinned else ram_buffer, pinned=pinned)
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
        if getattr(source, "pinned", False) and unit.index in getattr(source, "held", (unit.index,)):
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
    in_ram = isinstance(source, ResidentSource) or unit.index in getattr(source, "held", ())
    expected = unit_buffer_bytes(unit) if in_ram else sum(t.nbytes for t in unit.tensors)
    assert source.bytes_copied == before + expected


def test_the_host_tier_serves_held_units_from_ram_and_asks_the_file_for_the_rest_only(tmp_path):
    spec, root, state = write_model(tmp_path / "model", layers=3, sharded=False, tied=False)
    stream = SafetensorsSource(spec, root)
    tier = TieredSource(stream, (1, 3), CpuDevice(pinned_host=True).pinned_buffer, pinned=True)
    assert tier.held == (1, 3) and tier.bytes_streamed == 0
    assert tier.held_bytes == unit_buffer_bytes(spec.units[1]) + unit_buffer_bytes(spec.units[3])
    loaded = stream.bytes_copied
    for unit in spec.units:
        buffer = torch.zeros(unit_buffer_bytes(unit), dtype=torch.uint8)
        tier.read_unit(unit.index, buffer)
        host = tier.host_unit(unit.index)
        assert (host is not None) == (unit.index in (1, 3))  # pinned: uploaded from directly
    streamed = sum(unit_buffer_bytes(u) for u in spec.units if u.index not in (1, 3))
    assert tier.bytes_streamed == streamed
    assert stream.bytes_copied == loaded + sum(t.nbytes for u in spec.units if u.index not in (1, 3)
                                               for t in u.tensors)
    with pytest.raises(ConfigError, match="not decoders or the head"):
        TieredSource(stream, (0,), ram_buffer)
    tier.close()
