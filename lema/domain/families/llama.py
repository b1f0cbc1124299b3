"""The Llama family: Llama 1/2/3.x, Mistral, Qwen2 (RMSNorm, rotary, grouped-query attention, SwiGLU).

Options, as transformers 5 defines them per ``model_type``:

* llama: ``attention_bias`` (biases on q, k, v **and** o), ``mlp_bias`` (on gate, up,
  down), ``head_dim`` independent of hidden / heads, every rope type, tied or untied head.
  ``pretraining_tp > 1`` is refused (transformers 5 ignores it; nobody should assume it is
  honoured).
* mistral: no biases; ``sliding_window`` (default 4096) on every layer when set.
* qwen2: q, k, v biases always (o none); a window on the layers from
  ``max_window_layers`` on (or as ``layer_types`` says) when ``use_sliding_window``.

Refused for all: ``partial_rotary_factor`` other than 1, rope types transformers does not
ship, sliding layers without a window, and :func:`~lema.domain.nn.options.common_problems`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from lema.domain.families.family import Family
from lema.domain.nn import options as opt
from lema.domain.nn.decoder_io import DecoderParams, rms_final_norm, token_embedding
from lema.domain.nn.decoder_layout import (
    ATTENTION_KEYS, GATED_MLP_KEYS, attention_biases, attention_weights, decoder_dims, decoder_tensors, gated_mlp,
    head_dim, norm_weights,
)
from lema.domain.nn.layout import FULL, SLIDING, AttentionLayout, Dims, ExpectedTensor
from lema.domain.nn.layout import config_int as _int
from lema.domain.nn.rope_config import standard_rope

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights

NAME = "llama"
MODULE_KEYS = ATTENTION_KEYS + GATED_MLP_KEYS


def _biases(config: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o bias, MLP biases) of a config, by model_type."""
    model_type = str(config["model_type"]).lower()
    if model_type == "qwen2":
        return True, False, False
    if model_type == "mistral":
        return False, False, False
    attention = bool(config.get("attention_bias", False))
    return attention, attention, bool(config.get("mlp_bias", False))


def _attention(config: Mapping[str, Any], n_layers: int, problems: list[str]) -> tuple[tuple[str, ...], int | None]:
    model_type = str(config["model_type"]).lower()
    if model_type == "mistral":
        window = opt.window({"sliding_window": config.get("sliding_window", 4096)})
        return (SLIDING if window else FULL,) * n_layers, window
    if model_type == "qwen2":
        window = opt.window(config) if config.get("use_sliding_window", False) else None
        start = config.get("max_window_layers", 28)
        types = opt.layer_types(config, n_layers, [SLIDING if window is not None and i >= start else FULL
                                                   for i in range(n_layers)], problems)
        if SLIDING in types and window is None:
            problems.append(opt.problem("layer_types", list(types), "has sliding layers but use_sliding_window is "
                                        "false or sliding_window is null"))
        return types, window
    return (FULL,) * n_layers, None


def check(config: Mapping[str, Any]) -> None:
    """Refuse, by name and value, every option this family does not implement."""
    problems = opt.common_problems(config, "hidden_act", "silu")
    problems += opt.expect(config, "pretraining_tp", 1, lambda v: v in (1, None),
                           "is not implemented (transformers 5 ignores it); use 1")
    _attention(config, _int(config, "num_hidden_layers"), problems)
    opt.raise_problems(config, problems)
    standard_rope(config, head_dim(config))


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Llama-family config dict (options checked)."""
    check(config)
    return decoder_dims(config, NAME, head_dim(config), max_positions=2048, attention_bias=_biases(config)[0])


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Llama-family model with this config has, grouped into units."""
    qkv_bias, o_bias, mlp_bias = _biases(config)
    h, ff = d.hidden_size, d.intermediate_size
    layer = (norm_weights(d, "input_layernorm") + attention_weights(d) + norm_weights(d, "post_attention_layernorm")
             + gated_mlp(d))
    if qkv_bias:
        layer += attention_biases(d, o=False)
    if o_bias:
        layer.append(("self_attn.o_proj.bias", (h,)))
    if mlp_bias:
        layer += [("mlp.gate_proj.bias", (ff,)), ("mlp.up_proj.bias", (ff,)), ("mlp.down_proj.bias", (h,))]
    return decoder_tensors(d, [layer] * d.n_layers)


def params(config: Mapping[str, Any]) -> DecoderParams:
    """What a Llama, Mistral or Qwen2 layer reads from its config (the registry caches it per config)."""
    problems: list[str] = []
    types, window = _attention(config, _int(config, "num_hidden_layers"), problems)
    width = head_dim(config)
    rope = standard_rope(config, width)
    return DecoderParams(layout=AttentionLayout(types, window, ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-6)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=width)


def block(p: DecoderParams, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``LlamaDecoderLayer``)."""
    from lema.domain.nn import decoder_block, linear

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    return decoder_block.pre_norm_layer(p, w, proj, x, ctx, layer, kv_hook)


FAMILY = Family(name=NAME, model_types=("llama", "mistral", "qwen2"), module_keys=MODULE_KEYS, dims=dims,
                expected_tensors=expected_tensors, params=params, embed=token_embedding, block=block,
                final_norm=rms_final_norm)
