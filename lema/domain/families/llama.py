"""The Llama family: Llama 1/2/3, Mistral, Qwen2 (RMSNorm, rotary, grouped-query attention,
SwiGLU, optional q/k/v bias, tied or untied head): names, shapes, LoRA targets (pure)."""

from __future__ import annotations

from typing import Any, Mapping

from lema.domain.model.config_values import (
    ACTIVATIONS,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    ConfigFields,
    check_layer_types,
    check_rope,
)
from lema.domain.model.layout import Dims, ExpectedTensor

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
    """Read (and check) the dimensions of a Llama-family config dict.

    Raises:
        ModelFormatError: naming every field of the wrong type, out of bounds, or
            inconsistent with another (heads that do not divide the hidden size, ...).
    """
    f = ConfigFields(config)
    model_type = str(config["model_type"]).lower()
    hidden = f.int("hidden_size", maximum=MAX_HIDDEN)
    heads = f.int("num_attention_heads", maximum=MAX_HEADS)
    kv_heads = f.int("num_key_value_heads", default=heads, maximum=MAX_HEADS)
    head_dim = f.optional_int("head_dim", maximum=MAX_HEAD_DIM)
    if head_dim is None:
        f.check(hidden % heads == 0, f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                                     "(and no head_dim is given)")
        head_dim = max(hidden // heads, 1)
    f.check(heads % kv_heads == 0, f"num_attention_heads={heads} is not a multiple of "
                                   f"num_key_value_heads={kv_heads}")
    n_layers = f.int("num_hidden_layers", maximum=MAX_LAYERS)
    result = Dims(
        family=NAME, model_type=model_type,
        n_layers=n_layers, hidden_size=hidden, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=f.int("intermediate_size", maximum=MAX_INTERMEDIATE),
        vocab_size=f.int("vocab_size", maximum=MAX_VOCAB),
        tied_embeddings=f.bool("tie_word_embeddings", False),
        attention_bias=f.bool("attention_bias", model_type == "qwen2"),
        max_positions=f.int("max_position_embeddings", default=2048, maximum=MAX_POSITIONS),
    )
    # What the blocks read when the model runs: checked now, so a bad value stops the plan
    # rather than the first training step.
    f.positive_float("rms_norm_eps", 1e-6)
    f.str("hidden_act", "silu", ACTIVATIONS)
    f.optional_int("sliding_window", maximum=MAX_POSITIONS)
    f.bool("use_sliding_window", False)
    check_layer_types(f, n_layers)
    check_rope(f)
    f.done()
    return result


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
