"""Qwen3 (dense): Llama with a per-head RMSNorm on q and k before the rotary embedding.

Options, as ``Qwen3Config`` defines them: ``head_dim`` (default 128, independent of hidden
/ heads), ``attention_bias`` (biases on q, k, v and o), tied or untied head, every rope
type, and sliding-window layers when ``use_sliding_window`` (from ``max_window_layers`` on,
or as ``layer_types`` says; transformers nulls the window otherwise). Refused:
``partial_rotary_factor`` other than 1, sliding layers without a window, and
:func:`~lema.domain.nn.options.common_problems`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping


from lema.domain.families.family import Family
from lema.domain.nn import options as opt
from lema.domain.nn.decoder_io import DecoderParams, rms_final_norm, token_embedding
from lema.domain.nn.decoder_layout import (
    ATTENTION_KEYS, GATED_MLP_KEYS, attention_biases, attention_weights, decoder_dims, decoder_tensors, gated_mlp,
    head_dim, norm_weights, qk_norms,
)
from lema.domain.nn.layout import FULL, SLIDING, AttentionLayout, Dims, ExpectedTensor, ModelShape, PlanTerms
from lema.domain.nn.layout import config_int as _int
from lema.domain.nn.rope_config import standard_rope

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights

NAME = "qwen3"
MODULE_KEYS = ATTENTION_KEYS + GATED_MLP_KEYS


def _attention(config: Mapping[str, Any], problems: list[str]) -> tuple[tuple[str, ...], int | None]:
    n = _int(config, "num_hidden_layers")
    window = opt.window(config) if config.get("use_sliding_window", False) else None
    start = config.get("max_window_layers", 28)
    types = opt.layer_types(config, n, [SLIDING if window is not None and i >= start else FULL for i in range(n)],
                            problems)
    if SLIDING in types and window is None:
        problems.append(opt.problem("layer_types", list(types), "has sliding layers but use_sliding_window is false "
                                    "or sliding_window is null"))
    return types, window


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Qwen3 config dict (options checked)."""
    problems = opt.common_problems(config, "hidden_act", "silu")
    _attention(config, problems)
    opt.raise_problems(config, problems)
    standard_rope(config, head_dim(config, 128))
    return decoder_dims(config, NAME, head_dim(config, 128), max_positions=32768)


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Qwen3 model with this config has, grouped into units."""
    layer = (norm_weights(d, "input_layernorm") + attention_weights(d) + qk_norms(d.head_dim, d.head_dim)
             + norm_weights(d, "post_attention_layernorm") + gated_mlp(d))
    if d.attention_bias:
        layer += attention_biases(d)
    return decoder_tensors(d, [layer] * d.n_layers)


def params(config: Mapping[str, Any]) -> DecoderParams:
    """What a Qwen3 layer reads from its config (the registry caches it per config)."""
    types, window = _attention(config, [])
    rope = standard_rope(config, head_dim(config, 128))
    return DecoderParams(layout=AttentionLayout(types, window, ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-6)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=head_dim(config, 128))


def plan_terms(model: ModelShape) -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: q/k norms (per head)."""
    return PlanTerms(qk_norm_width=(model.n_heads + model.n_kv_heads) * model.head_dim)


def block(p: DecoderParams, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Qwen3DecoderLayer``): Llama's, with q and k normalised per head."""
    from lema.domain.nn import decoder_block, linear

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    return decoder_block.pre_norm_layer(p, w, proj, x, ctx, layer, kv_hook, qk_norm=True)


FAMILY = Family(name=NAME, model_types=("qwen3",), module_keys=MODULE_KEYS, dims=dims,
                expected_tensors=expected_tensors, params=params, embed=token_embedding, block=block,
                final_norm=rms_final_norm, plan_terms=plan_terms)
