"""Small Llama-shaped safetensors models with several dtypes, for streaming tests.

Norms are F32, attention matrices BF16, MLP matrices F16, so units mix dtypes and
tensor sizes that are not multiples of 64 bytes (slot padding is exercised).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lema.adapters.weights.safetensors_header import read_header
from lema.adapters.weights.shard_index import read_sharded
from lema.domain.model.spec import ModelSpec


def stream_config(layers: int = 3, tied: bool = False, bias: bool = True) -> dict:
    return {"model_type": "qwen2" if bias else "llama", "hidden_size": 24, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40, "vocab_size": 50,
            "max_position_embeddings": 64, "tie_word_embeddings": tied, "attention_bias": bias}


def _dtype_for(name: str) -> torch.dtype:
    if "norm" in name:
        return torch.float32
    if "self_attn" in name:
        return torch.bfloat16
    return torch.float16


def stream_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every name the config implies (file names -> tensors)."""
    spec = ModelSpec.from_config(config, dtype="F16")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for unit in spec.units:
        for t in unit.tensors:
            if t.name not in out:
                out[t.name] = torch.randn(t.shape, generator=gen).to(_dtype_for(t.name))
    return out


def write_model(folder: Path, layers: int = 3, sharded: bool = False, tied: bool = False,
                seed: int = 0) -> tuple[ModelSpec, Path, dict[str, torch.Tensor]]:
    """Write a model under ``folder``; returns (spec, root, state_dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = stream_config(layers, tied)
    state = stream_state_dict(config, seed)
    meta = {"config": json.dumps(config)}
    if not sharded:
        save_file(state, str(folder / "model.safetensors"), metadata=meta)
        header = read_header(folder / "model.safetensors").tensors
    else:
        names = sorted(state)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        weight_map = {}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(folder / shard), metadata=meta)
            weight_map.update({k: shard for k in keys})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        header, _ = read_sharded(folder / "model.safetensors.index.json")
    (folder / "config.json").write_text(json.dumps(config))
    return ModelSpec.from_header(header, config), folder, state
