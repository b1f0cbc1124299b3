"""ModelSpec: tensors, units and byte counts from a config or a safetensors header."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lema.adapters.weights.builtin_models import builtin_config, builtin_names
from lema.adapters.weights.safetensors_header import read_header
from lema.domain.model.spec import ModelSpec, dtype_code, itemsize, torch_dtype
from lema.errors import ModelFormatError
from tests.sparse_models import model_tensors, write_sparse_safetensors

TINY = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "intermediate_size": 96, "vocab_size": 128}


def _reference_parameters(config: dict) -> int:
    """Parameter count of transformers' own model (built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", builtin_names())
def test_parameters_match_transformers_for_every_builtin(name):
    """Two layers of each built-in config: ModelSpec counts what transformers builds."""
    config = dict(builtin_config(name))
    layers_key = "n_layer" if config["model_type"] == "gpt2" else "num_hidden_layers"
    config[layers_key] = 2
    config.pop("max_window_layers", None)
    assert ModelSpec.from_config(config).parameters == _reference_parameters(config)


def test_llama2_7b_numbers():
    spec = ModelSpec.from_config(builtin_config("llama-2-7b"))
    assert spec.dtype == "F16"
    assert spec.parameters == 6_738_415_616
    assert spec.weight_bytes == 13_476_831_232
    assert spec.largest_layer_bytes == 404_766_720
    assert [u.name for u in spec.units[:2]] + [spec.units[-1].name] == ["embed", "layers.0", "head"]
    assert len(spec.decoder_units) == 32


def test_tied_head_is_counted_once_and_streamed_with_the_head():
    spec = ModelSpec.from_config(builtin_config("qwen2.5-0.5b"))
    assert spec.tied_embeddings
    head = spec.head_unit.tensor("lm_head.weight")
    assert head.name == "model.embed_tokens.weight"
    assert spec.parameters == 494_032_768
    assert spec.largest_unit_bytes == spec.head_unit.nbytes > spec.largest_layer_bytes


def test_from_header_matches_from_config_and_keeps_offsets(tmp_path):
    path = write_sparse_safetensors(tmp_path / "m.safetensors", TINY, "BF16")
    header = read_header(path)
    spec = ModelSpec.from_header(header.tensors, TINY)
    ref = ModelSpec.from_config(TINY, dtype="BF16")
    assert (spec.parameters, spec.weight_bytes, spec.dtype) == (ref.parameters, ref.weight_bytes, "BF16")
    for unit in spec.units:
        for t in unit.tensors:
            assert t.file == "m.safetensors"
            assert t.start == header.tensors[t.name]["start"]
    ends = sorted((t.start, t.end) for u in spec.units for t in u.tensors)
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # no overlap


def test_from_header_lists_every_missing_and_misshapen_tensor():
    tensors = {name: {"dtype": dt, "shape": list(shape)} for name, dt, shape in model_tensors(TINY, "F16")}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.2.self_attn.q_proj.weight"]["shape"] = [64, 63]
    with pytest.raises(ModelFormatError) as err:
        ModelSpec.from_header(tensors, TINY)
    assert "missing model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.2.self_attn.q_proj.weight has shape [64, 63]" in str(err.value)


def test_from_header_without_decoder_layers_says_so():
    tensors = {"foo": {"dtype": "F16", "shape": [4]}, "bar": {"dtype": "F16", "shape": [2, 2]}}
    with pytest.raises(ModelFormatError, match="no recognisable llama decoder layers"):
        ModelSpec.from_header(tensors, TINY)


def test_mixed_dtype_ties_resolve_the_same_way_every_time():
    tensors = {name: {"dtype": "F16" if i % 2 else "BF16", "shape": list(shape)}
               for i, (name, _, shape) in enumerate(model_tensors(TINY, "F16"))}
    codes = {ModelSpec.from_header(dict(reversed(list(tensors.items()))), TINY).dtype,
             ModelSpec.from_header(tensors, TINY).dtype}
    assert len(codes) == 1


@pytest.mark.parametrize("config, match", [
    ({"model_type": "bert"}, "unknown architecture"),
    ({**TINY, "hidden_size": 0}, "hidden_size=0 must be a positive integer"),
    ({k: v for k, v in TINY.items() if k != "vocab_size"}, "missing vocab_size"),
])
def test_bad_configs_raise_model_format_error(config, match):
    with pytest.raises(ModelFormatError, match=match):
        ModelSpec.from_config(config)


def test_gpt2_uses_conv1d_layout_and_either_prefix():
    config = {**builtin_config("gpt2"), "n_layer": 2}
    spec = ModelSpec.from_config(config)
    assert spec.decoder_units[0].tensor("attn.c_attn.weight").shape == (768, 2304)
    bare = {n.removeprefix("transformer."): {"dtype": dt, "shape": list(s)} for n, dt, s in model_tensors(config, "F32")}
    assert ModelSpec.from_header(bare, config).parameters == spec.parameters


@pytest.mark.parametrize("value, code", [("bfloat16", "BF16"), ("bf16", "BF16"), ("F16", "F16"), ("half", "F16"),
                                         (torch.float32, "F32"), ("float", "F32")])
def test_dtype_code_normalises_names(value, code):
    assert dtype_code(value) == code
    assert torch_dtype(code).itemsize == itemsize(code)


def test_dtype_code_rejects_unknown_names():
    with pytest.raises(ModelFormatError, match="unknown dtype"):
        dtype_code("float8")


def test_importing_spec_does_not_import_torch():
    """Planning must start fast: the spec and header reader leave torch unimported."""
    code = ("import sys, lema.domain.model.spec, lema.adapters.weights.safetensors_header, lema.adapters.weights.model_files; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_an_output_dtype_must_be_floating_point():
    from lema.domain.model.spec import output_dtype
    from lema.errors import ConfigError

    assert str(output_dtype("bf16")) == "torch.bfloat16"
    with pytest.raises(ConfigError, match="not a floating-point dtype"):
        output_dtype("int8")
