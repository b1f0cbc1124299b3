"""Every WeightSource adapter serves a quantized file's stored tensors byte for byte: odd sizes
(the JSON states), a 0-d tensor (int8's ``weight_format``) and 4-bit data, in and out of a buffer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lema.adapters.weights.model_files import resolve_model
from lema.adapters.weights.resident_source import ResidentSource
from lema.adapters.weights.safetensors_source import SafetensorsSource
from lema.domain.schedule.slot_layout import unit_buffer_bytes

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("variant", ["nf4_dq", "int8"])
@pytest.mark.parametrize("adapter", ["safetensors-pread", "safetensors-mmap", "resident"])
def test_stored_tensors_arrive_bit_identical(quantized_model, variant, adapter):
    folder = quantized_model("llama", variant)
    resolved = resolve_model(str(folder))
    spec = resolved.spec
    state = load_file(folder / "model.safetensors")
    assert json.loads(spec.config_json)["quantization_config"]["quant_method"] == "bitsandbytes"
    if adapter == "resident":
        source = ResidentSource.from_safetensors(spec, resolved.root)
    else:
        source = SafetensorsSource(spec, resolved.root, method=adapter.split("-")[1])
    buffer = torch.full((max(unit_buffer_bytes(u) for u in spec.units),), 0xAB, dtype=torch.uint8)
    try:
        for unit in spec.units:
            for got in (source.read_unit(unit.index), source.read_unit(unit.index, buffer)):
                assert set(got) == {t.key for t in unit.tensors}
                for t in unit.tensors:
                    want = state[t.name]
                    assert got[t.key].dtype == want.dtype and got[t.key].shape == want.shape, t.name
                    assert torch.equal(got[t.key], want), t.name
    finally:
        source.close()
