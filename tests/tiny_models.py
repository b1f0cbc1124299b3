"""Tiny transformers models for tests: the reference implementations LEMA must agree with.

``tiny_config(kind)`` gives a config dict, ``build_hf_model(kind, seed)`` the transformers
model (fp32, eval mode, SDPA attention) and ``unit_weights(spec, state_dict)`` the per-unit
``key -> tensor`` dicts LEMA's blocks read.
"""

from __future__ import annotations

from typing import Any

import torch

from lema.domain.model.spec import ModelSpec

KINDS = ("llama", "llama3_rope", "llama_linear", "llama_longrope", "mistral", "qwen2", "qwen2_window", "gpt2")


def tiny_config(kind: str) -> dict[str, Any]:
    """A small config dict (hidden 64, 3 layers, 4 heads, 2 kv heads, vocab 128)."""
    llama = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 96, "vocab_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False}
    if kind == "llama":
        return {"model_type": "llama", **llama}
    if kind == "llama3_rope":
        return {"model_type": "llama", **llama, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}
    if kind == "llama_linear":
        return {"model_type": "llama", **llama, "rope_scaling": {"type": "linear", "factor": 4.0}}  # legacy "type"
    if kind == "llama_longrope":  # the long factors apply past 8 positions (the tests use 12)
        return {"model_type": "llama", **llama, "max_position_embeddings": 32,
                "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
                                    "short_factor": [1.0 + 0.05 * i for i in range(8)],
                                    "long_factor": [1.2 + 0.2 * i for i in range(8)]}}
    if kind == "qwen2_window":  # layers 1 and 2 slide (from max_window_layers on), layer 0 does not
        return {"model_type": "qwen2", **llama, "use_sliding_window": True, "sliding_window": 5,
                "max_window_layers": 1}
    if kind == "llama_dynamic":  # dynamic NTK: frequencies depend on the sequence length
        return {"model_type": "llama", **llama, "max_position_embeddings": 8,
                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    if kind == "mistral":
        return {"model_type": "mistral", **llama, "sliding_window": 5}
    if kind == "qwen2":
        return {"model_type": "qwen2", **llama, "tie_word_embeddings": True}
    if kind == "gpt2":
        return {"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 128, "n_positions": 64,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
                "bos_token_id": 0, "eos_token_id": 0}
    raise ValueError(kind)


def build_hf_model(kind: str, seed: int = 0) -> Any:
    """The transformers ``*ForCausalLM`` of :func:`tiny_config`, randomly initialised, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(tiny_config(kind))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so differences are not hidden by tiny values
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model.eval()


def spec_of(model: Any) -> ModelSpec:
    """The ModelSpec of a transformers model (shapes from its config, dtype F32)."""
    return ModelSpec.from_config(model.config.to_dict(), dtype="F32")


def unit_weights(spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """For every unit, ``key -> tensor`` taken from a transformers state dict (by ``TensorSpec.name``)."""
    out = []
    for unit in spec.units:
        weights = {}
        for t in unit.tensors:
            name = t.name if t.name in state_dict else next(n for n in (t.name, "lm_head.weight") if n in state_dict)
            weights[t.key] = state_dict[name].detach()
        out.append(weights)
    return out
