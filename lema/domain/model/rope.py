"""Rotary position embeddings for the Llama family, computed the way transformers does.

The inverse frequencies and the attention scaling come from transformers'
``ROPE_INIT_FUNCTIONS`` (linear, dynamic, yarn, longrope, llama3, ...), applied to a config
object built from the model's own ``config.json`` (never remote code), so every scaling
variant transformers knows is reproduced rather than re-derived.

Example:
    >>> import json, torch
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100}
    >>> cos, sin = rope_cos_sin(json.dumps(cfg), torch.arange(5)[None], torch.float32)
    >>> cos.shape
    torch.Size([1, 5, 16])
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch


@functools.lru_cache(maxsize=16)
def hf_config(config_json: str) -> Any:
    """A transformers config object for a ``config.json`` text (cached; treat as read-only)."""
    from transformers import (
        AutoConfig,  # heavy import, and only the Llama family needs it
    )

    return AutoConfig.for_model(**json.loads(config_json))


def _default_inv_freq(config: Any) -> tuple[torch.Tensor, float]:
    # Mirrors LlamaRotaryEmbedding.compute_default_rope_parameters (not in ROPE_INIT_FUNCTIONS).
    base = config.rope_parameters["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


@functools.lru_cache(maxsize=16)
def _base_inv_freq(config_json: str) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config(config_json)
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type == "default":
        return _default_inv_freq(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None)


def inv_freq_for(config_json: str, max_position: int) -> tuple[torch.Tensor, float]:
    """The inverse frequencies and cos/sin scaling for positions up to ``max_position``.

    Dynamic NTK and LongRoPE depend on the sequence length; this follows transformers'
    ``dynamic_rope_update`` for a fresh model (no state carried between calls).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config(config_json)
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    seq_len = max_position + 1
    if "dynamic" in rope_type and seq_len > config.max_position_embeddings:
        return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
    if rope_type == "longrope":
        original = params.get("original_max_position_embeddings", config.max_position_embeddings)
        if seq_len > original:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=original + 1)
            return inv_freq, _base_inv_freq(config_json)[1]
    return _base_inv_freq(config_json)


def rope_cos_sin(config_json: str, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each ``(batch, seq, head_dim)`` in ``dtype``, for ``position_ids``.

    Args:
        config_json: the model's ``config.json`` text (``ModelSpec.config_json``).
        position_ids: ``(batch, seq)`` integer positions.
        dtype: the compute dtype (transformers casts cos/sin to the activations' dtype).
    """
    params = getattr(hf_config(config_json), "rope_parameters", None) or {}
    dynamic = "dynamic" in params.get("rope_type", "default") or params.get("rope_type") == "longrope"
    max_position = int(position_ids.max()) if dynamic and position_ids.numel() else 0
    inv_freq, scaling = inv_freq_for(config_json, max_position)
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` (``(batch, heads, seq, head_dim)``) by ``(batch, seq, head_dim)`` tables."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
