"""Every family implements a config option or refuses it by name and value; every tensor of a
file is consumed or refused; reading configs never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lema.domain.families import registry
from lema.domain.model.spec import ModelSpec
from lema.errors import ModelFormatError
from tests.family_models import FAMILIES, config
from tests.sparse_models import model_tensors


def _config(name: str, **changes) -> dict:
    return {**config(name).to_dict(), **changes}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_reads_its_transformers_config(name):
    spec = ModelSpec.from_config(_config(name))
    assert spec.family == name and spec.n_layers == 2
    assert registry.params_of(spec).layout.layer_types  # the blocks' parameters parse too


@pytest.mark.parametrize("name, change, named", [
    ("llama", {"pretraining_tp": 2}, "pretraining_tp=2"),
    ("llama", {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}, "rope_type='proportional'"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("llama", {"hidden_act": "swiglu_oai"}, "hidden_act='swiglu_oai'"),
    ("llama", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config="),
    ("llama", {"quantization_config": {"quant_method": "bitsandbytes"}}, "neither load_in_4bit nor load_in_8bit"),
    ("qwen3", {"use_sliding_window": False, "layer_types": ["full_attention", "sliding_attention"]},
     "layer_types=['full_attention', 'sliding_attention']"),
    ("qwen3", {"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
    ("gemma2", {"sliding_window": None}, "sliding_window=None"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "mrope", "rope_theta": 1e6}}},
     "rope_type='mrope'"),
    ("phi3", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0}}, "rope_type='llama3'"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "short_factor has 1 values"),
    ("olmo2", {"hidden_act": "tanh"}, "hidden_act='tanh'"),
    ("mixtral", {"output_router_logits": True}, "output_router_logits=True"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ("qwen3_moe", {"output_router_logits": True}, "output_router_logits=True"),
    ("qwen3_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
])
def test_an_option_not_implemented_is_refused_by_name_and_value(name, change, named):
    with pytest.raises(ModelFormatError) as err:
        ModelSpec.from_config(_config(name, **change))
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, change", [
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "rope_theta": 5e5}}),
    ("phi3", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6},
              "partial_rotary_factor": 0.75}),
    ("gemma3", {"attn_logit_softcapping": 50.0}),  # ignored by transformers' Gemma 3 too
    ("gpt2", {}),
])
def test_implemented_options_and_legacy_spellings_are_accepted(name, change):
    base = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64} if name == "gpt2" \
        else _config(name)
    assert ModelSpec.from_config({**base, **change}).family == name


@pytest.mark.parametrize("name", FAMILIES)
def test_a_tensor_the_math_does_not_use_is_named(name):
    cfg = _config(name)
    header = {n: {"dtype": dt, "shape": list(s)} for n, dt, s in model_tensors(cfg, "F32")}
    ModelSpec.from_header(header, cfg)  # the expected tensors alone are fine
    header["model.layers.1.mlp.extra.weight"] = {"dtype": "F32", "shape": [4]}
    header["model.layers.0.self_attn.rotary_emb.inv_freq"] = {"dtype": "F32", "shape": [4]}  # a known buffer
    with pytest.raises(ModelFormatError) as err:
        ModelSpec.from_header(header, cfg)
    assert "model.layers.1.mlp.extra.weight" in str(err.value) and "inv_freq" not in str(err.value)


def test_experts_fused_in_memory_are_not_the_on_disk_layout():
    """A MoE file saved from ``model.state_dict()`` (fused experts) is refused, listing the fused tensors."""
    cfg = _config("mixtral")
    header = {n: {"dtype": dt, "shape": list(s)} for n, dt, s in model_tensors(cfg, "F32")
              if ".experts." not in n}
    header["model.layers.0.mlp.experts.gate_up_proj"] = {"dtype": "F32", "shape": [4, 192, 64]}
    with pytest.raises(ModelFormatError) as err:
        ModelSpec.from_header(header, cfg)
    message = str(err.value)
    assert "mlp.experts.gate_up_proj" in message and "save_pretrained" in message
    assert "missing model.layers.0.block_sparse_moe.experts.0.w1.weight" in message


def test_moe_default_targets_are_the_attention_projections_and_all_linear_is_refused():
    from lema.domain.model.lora import resolve_targets
    from lema.errors import ConfigError

    for name in ("mixtral", "qwen3_moe"):
        assert resolve_targets(name, None) == ("q_proj", "k_proj", "v_proj", "o_proj")
        with pytest.raises(ConfigError, match="experts"):
            resolve_targets(name, ["all-linear"])
        with pytest.raises(ConfigError, match="experts and the router is not implemented"):
            resolve_targets(name, ["w1"])
    assert resolve_targets("phi3", ["all-linear"]) == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_reading_configs_and_planning_never_import_torch():
    code = ("import sys\n"
            "from lema.adapters.weights.builtin_models import builtin_config, builtin_names\n"
            "from lema.domain.model.spec import ModelSpec\n"
            "from lema.domain.plan.planner import plan\n"
            "for name in builtin_names():\n"
            "    plan(ModelSpec.from_config(builtin_config(name)))\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "llama"])
def test_the_base_models_dropouts_are_listed(name):
    from lema.domain.families.registry import base_dropouts

    assert base_dropouts(_config(name, attention_dropout=0.0)) == {}
    assert base_dropouts(_config(name, attention_dropout=0.1)) == {"attention_dropout": 0.1}
