"""The quantized format's description: stored tensors, the spec of a packed model, and refusals.

The expected names, dtypes and shapes come from transformers + bitsandbytes: a tiny model
quantized and saved by them, and ``BitsAndBytesConfig.to_dict()``.
"""

from __future__ import annotations

import pytest

from lema.adapters.weights.builtin_models import builtin_config
from lema.adapters.weights.safetensors_header import read_header
from lema.domain.nn.quant import QuantFormat, bytes_per_parameter, format_of
from lema.domain.model.spec import ModelSpec
from lema.errors import ConfigError, ModelFormatError
from tests.quant_models import VARIANTS, bnb_config

pytest.importorskip("bitsandbytes")

TINY = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "intermediate_size": 96, "vocab_size": 128, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _format(variant: str) -> QuantFormat:
    return QuantFormat.parse(variant.split("_")[0], double_quant=variant.endswith("_dq"))


@pytest.fixture(scope="module")
def folders(quantized_model):
    return {v: quantized_model("llama", v) for v in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_planned_spec_stores_what_transformers_writes(folders, variant):
    import json

    header = read_header(folders[variant] / "model.safetensors")
    config = json.loads((folders[variant] / "config.json").read_text())
    dense = {k: v for k, v in config.items() if k != "quantization_config"}
    planned = ModelSpec.from_config(dense, dtype="F32").quantized(_format(variant))
    stored = {t.name: (t.dtype, t.shape) for u in planned.units for t in u.tensors}
    written = {n: (e["dtype"], tuple(e["shape"])) for n, e in header.tensors.items()}
    assert set(stored) == set(written)
    blobs = {n for n in stored if ".quant_state." in n}
    assert {n: v for n, v in stored.items() if n not in blobs} == {n: v for n, v in written.items() if n not in blobs}
    # The JSON state's length depends on the weights' mean scale (double quant) by a few bytes.
    assert all(abs(stored[n][1][0] - written[n][1][0]) <= 8 for n in blobs)
    # A config that declares the quantization (a Hub id's config.json) plans the same tensors.
    declared = ModelSpec.from_config(config, dtype="F32")
    assert declared.quantization == _format(variant)
    assert {t.name: (t.dtype, t.shape) for u in declared.units for t in u.tensors} == stored


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_header_written_by_transformers_reads_as_the_dense_model(folders, variant):
    import json

    header = read_header(folders[variant] / "model.safetensors")
    config = json.loads((folders[variant] / "config.json").read_text())
    spec = ModelSpec.from_header(header.tensors, config)
    dense = ModelSpec.from_config({k: v for k, v in config.items() if k != "quantization_config"}, dtype="F32")
    assert spec.quantization == _format(variant)
    assert spec.dtype == "F32" and spec.parameters == dense.parameters
    layer = spec.units[1]
    assert [p.key for p in layer.packed] == [t.key for t in dense.units[1].tensors if len(t.shape) == 2]
    assert layer.dense_shape("mlp.up_proj.weight") == (96, 64)
    assert not spec.units[0].packed and not spec.head_unit.packed  # embeddings and head stay dense
    assert spec.weight_bytes < dense.weight_bytes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantization_config_is_what_bitsandbytes_config_writes(variant):
    import torch

    for dtype, code in ((torch.float32, "F32"), (torch.bfloat16, "BF16")):
        assert _format(variant).to_config(code) == bnb_config(variant, dtype).to_dict()
        assert format_of({"quantization_config": bnb_config(variant, dtype).to_dict()}) == _format(variant)


def test_bytes_per_parameter():
    assert bytes_per_parameter(QuantFormat("nf4")) == pytest.approx(0.5625, abs=1e-4)
    assert bytes_per_parameter(QuantFormat("nf4", True)) == pytest.approx(0.516, abs=1e-3)
    assert bytes_per_parameter(QuantFormat("int8")) == pytest.approx(1.001, abs=1e-3)


def test_a_70b_model_in_nf4_is_about_a_quarter_of_its_16_bit_bytes():
    spec = ModelSpec.from_config(builtin_config("llama-3.1-70b"))
    packed = spec.quantized(QuantFormat.parse("nf4"))
    assert packed.parameters == spec.parameters
    assert 0.25 < packed.largest_layer_bytes / spec.largest_layer_bytes < 0.27
    assert packed.head_unit.nbytes == spec.head_unit.nbytes  # the head stays 16-bit


def test_refusals():
    with pytest.raises(ConfigError, match="nf4, fp4 or int8"):
        QuantFormat.parse("q4_k")
    with pytest.raises(ConfigError, match="Conv1D"):
        ModelSpec.from_config(builtin_config("gpt2")).quantized(QuantFormat.parse("nf4"))
    packed = ModelSpec.from_config(TINY, dtype="BF16").quantized(QuantFormat.parse("nf4"))
    assert packed.quantized(QuantFormat.parse("nf4")) is packed
    with pytest.raises(ConfigError, match="already quantized"):
        packed.quantized(QuantFormat.parse("int8"))
    with pytest.raises(ModelFormatError, match=r"quantization_config=\{'quant_method': 'gptq'.*is not supported"):
        ModelSpec.from_config({**TINY, "quantization_config": {"quant_method": "gptq", "bits": 4}})


def test_a_packed_tensor_of_the_wrong_dtype_is_named(folders):
    import json

    header = read_header(folders["nf4_dq"] / "model.safetensors").tensors
    config = json.loads((folders["nf4_dq"] / "config.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight.absmax"
    bad = {**header, name: {**header[name], "dtype": "F16"}}
    with pytest.raises(ModelFormatError, match=r"down_proj.weight.absmax is F16.*stores it as U8"):
        ModelSpec.from_header(bad, config)
    missing = {n: e for n, e in header.items() if n != "model.layers.0.self_attn.q_proj.weight.quant_map"}
    with pytest.raises(ModelFormatError, match="missing model.layers.0.self_attn.q_proj.weight.quant_map"):
        ModelSpec.from_header(missing, config)
