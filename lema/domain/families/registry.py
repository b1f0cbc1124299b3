"""Per-family tensor naming, shapes and LoRA default targets.

Two families are supported:

* ``llama``: Llama 1/2/3, Mistral, Qwen2 (RMSNorm, rotary, grouped-query attention,
  SwiGLU, optional q/k/v bias, tied or untied head).
* ``gpt2``: GPT-2 (LayerNorm, learned positions, Conv1D ``[in, out]`` weights, GELU,
  tied head).

Each tensor of a model belongs to one *unit*: unit 0 is the embedding, units 1..L are the
decoder layers and unit L+1 is the head (final norm + output projection). Inside a unit a
tensor has a *key*, its name with the unit's prefix removed (``self_attn.q_proj.weight``),
which is what the functional blocks read.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import attrs

from lema.errors import ModelFormatError

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
GPT2_MODEL_TYPES = ("gpt2",)

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")

EMBED, DECODER, HEAD = "embed", "decoder", "head"


@attrs.frozen
class ExpectedTensor:
    """One tensor a model of this config must have.

    Attributes:
        unit: unit index (0 embed, 1..L decoders, L+1 head).
        key: name inside the unit, as the blocks read it.
        names: file names it may be stored under, preferred first (tied weights have two).
        shape: the shape the config implies.
        optional: True for tensors some checkpoints omit (e.g. a tied ``lm_head.weight``).
    """

    unit: int
    key: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    optional: bool = False


@attrs.frozen
class Dims:
    """The dimensions of a model, read from its Hugging Face ``config.json``."""

    family: str
    model_type: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    attention_bias: bool
    max_positions: int


def family_of(config: Mapping[str, Any]) -> str:
    """Return ``"llama"`` or ``"gpt2"`` for a config dict, or raise ModelFormatError."""
    model_type = str(config.get("model_type", "")).lower()
    if model_type in LLAMA_MODEL_TYPES:
        return "llama"
    if model_type in GPT2_MODEL_TYPES:
        return "gpt2"
    archs = config.get("architectures") or []
    raise ModelFormatError(
        f"unknown architecture: model_type {model_type or '(missing)'!r} "
        f"{'(' + ', '.join(map(str, archs)) + ') ' if archs else ''}is not supported; LEMA "
        f"trains {', '.join(LLAMA_MODEL_TYPES + GPT2_MODEL_TYPES)} models"
    )


def _int(config: Mapping[str, Any], *names: str, default: int | None = None) -> int:
    for name in names:
        value = config.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"config.json: {name}={value!r} must be a positive integer")
            return value
    if default is not None:
        return default
    raise ModelFormatError(f"config.json: missing {' or '.join(names)}; is this a causal LM config?")


def dims_of(config: Mapping[str, Any]) -> Dims:
    """Read a model's dimensions from its config dict (pure)."""
    family = family_of(config)
    model_type = str(config["model_type"]).lower()
    if family == "gpt2":
        hidden = _int(config, "n_embd", "hidden_size")
        heads = _int(config, "n_head", "num_attention_heads")
        return Dims(
            family=family, model_type=model_type,
            n_layers=_int(config, "n_layer", "num_hidden_layers"), hidden_size=hidden,
            n_heads=heads, n_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=_int(config, "n_inner", default=4 * hidden),
            vocab_size=_int(config, "vocab_size"), tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            attention_bias=True, max_positions=_int(config, "n_positions", "n_ctx", default=1024),
        )
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


def default_targets(family: str) -> tuple[str, ...]:
    """The LoRA target modules LEMA uses when none are given."""
    return LLAMA_TARGETS if family == "llama" else ("c_attn",)


def target_modules(family: str) -> tuple[str, ...]:
    """Every module name LoRA can target in this family."""
    return LLAMA_TARGETS if family == "llama" else GPT2_TARGETS


def expected_tensors(dims: Dims, prefix: str | None = None) -> list[ExpectedTensor]:
    """Every tensor a model with these dims has, grouped into units (pure).

    Args:
        dims: from :func:`dims_of`.
        prefix: GPT-2 only: ``"transformer."`` (transformers' layout, the default) or ``""``
            (the original OpenAI checkpoints).
    """
    if dims.family == "gpt2":
        return _gpt2_tensors(dims, "transformer." if prefix is None else prefix)
    return _llama_tensors(dims)


def _llama_tensors(d: Dims) -> list[ExpectedTensor]:
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


def _gpt2_tensors(d: Dims, p: str) -> list[ExpectedTensor]:
    h, ff = d.hidden_size, d.intermediate_size
    out = [
        ExpectedTensor(0, "wte.weight", (p + "wte.weight",), (d.vocab_size, h)),
        ExpectedTensor(0, "wpe.weight", (p + "wpe.weight",), (d.max_positions, h)),
    ]
    for i in range(d.n_layers):
        lp = f"{p}h.{i}."
        layer = [
            ("ln_1.weight", (h,)), ("ln_1.bias", (h,)),
            ("attn.c_attn.weight", (h, 3 * h)), ("attn.c_attn.bias", (3 * h,)),
            ("attn.c_proj.weight", (h, h)), ("attn.c_proj.bias", (h,)),
            ("ln_2.weight", (h,)), ("ln_2.bias", (h,)),
            ("mlp.c_fc.weight", (h, ff)), ("mlp.c_fc.bias", (ff,)),
            ("mlp.c_proj.weight", (ff, h)), ("mlp.c_proj.bias", (h,)),
        ]
        out += [ExpectedTensor(i + 1, key, (lp + key,), shape) for key, shape in layer]
    head = d.n_layers + 1
    out += [
        ExpectedTensor(head, "ln_f.weight", (p + "ln_f.weight",), (h,)),
        ExpectedTensor(head, "ln_f.bias", (p + "ln_f.bias",), (h,)),
        ExpectedTensor(head, "lm_head.weight", ("lm_head.weight", p + "wte.weight"), (d.vocab_size, h)),
    ]
    return out


# Buffers some checkpoints carry that are not weights (GPT-2's causal mask, rotary caches).
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def is_ignored(name: str) -> bool:
    """True for non-weight buffers found in some checkpoints."""
    return bool(_IGNORED.search(name))


def gpt2_prefix(names: set[str]) -> str:
    """``"transformer."`` or ``""``, whichever layout a set of GPT-2 tensor names uses."""
    return "" if "wte.weight" in names and "transformer.wte.weight" not in names else "transformer."
