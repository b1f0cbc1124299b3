"""The Llama family: Llama 1/2/3, Mistral, Qwen2 (RMSNorm, rotary, grouped-query attention,
SwiGLU, optional q/k/v bias, tied or untied head): names, shapes, LoRA targets (pure)."""

from __future__ import annotations

from typing import Any, Mapping

from lema.domain.model.layout import Dims, ExpectedTensor
from lema.domain.model.layout import config_int as _int

NAME = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = TARGETS


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's own dropout probabilities that are not zero (LEMA does not apply them).

    Llama, Mistral and Qwen2 have ``attention_dropout`` (0.0 in transformers and in every
    released config)."""
    value = config.get("attention_dropout", 0.0)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return {"attention_dropout": float(value)}
    return {}


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Llama-family config dict."""
    model_type = str(config["model_type"]).lower()
    family = NAME
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    head_dim = config.get("head_dim") or hidden // heads
    return Dims(
        family=family, model_type=model_type,
        n_layers=_int(config, "num_hidden_layers"), hidden_size=hidden, n_heads=heads,
        n_kv_heads=_int(config, "num_key_value_heads", default=heads), head_dim=int(head_dim),
        intermediate_size=_int(config, "intermediate_size"), vocab_size=_int(config, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        max_positions=_int(config, "max_position_embeddings", default=2048),
    )




def expected_tensors(d: Dims, prefix: str | None = None) -> list[ExpectedTensor]:
    """Every tensor a Llama-family model with these dims has, grouped into units."""
    h, q, kv, ff = d.hidden_size, d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim, d.intermediate_size
    out = [ExpectedTensor(0, "embed_tokens.weight", ("model.embed_tokens.weight",), (d.vocab_size, h))]
    for i in range(d.n_layers):
        p = f"model.layers.{i}."
        layer = [
            ("input_layernorm.weight", (h,)),
            ("self_attn.q_proj.weight", (q, h)),
            ("self_attn.k_proj.weight", (kv, h)),
            ("self_attn.v_proj.weight", (kv, h)),
            ("self_attn.o_proj.weight", (h, q)),
            ("post_attention_layernorm.weight", (h,)),
            ("mlp.gate_proj.weight", (ff, h)),
            ("mlp.up_proj.weight", (ff, h)),
            ("mlp.down_proj.weight", (h, ff)),
        ]
        if d.attention_bias:
            layer += [("self_attn.q_proj.bias", (q,)), ("self_attn.k_proj.bias", (kv,)), ("self_attn.v_proj.bias", (kv,))]
        out += [ExpectedTensor(i + 1, key, (p + key,), shape) for key, shape in layer]
    head = d.n_layers + 1
    out.append(ExpectedTensor(head, "norm.weight", ("model.norm.weight",), (h,)))
    if d.tied_embeddings:
        out.append(ExpectedTensor(head, "lm_head.weight", ("lm_head.weight", "model.embed_tokens.weight"), (d.vocab_size, h)))
    else:
        out.append(ExpectedTensor(head, "lm_head.weight", ("lm_head.weight",), (d.vocab_size, h)))
    return out
