"""Gemma 2: scaled embeddings, ``1 + w`` RMSNorms around both sub-layers, GeGLU, soft-capping.

Options, as ``Gemma2Config`` defines them: ``head_dim`` (default 256),
``query_pre_attn_scalar`` (the scores' scale is its inverse square root),
``attn_logit_softcapping`` (scores capped by ``tanh(s / cap) * cap`` before the mask),
``final_logit_softcapping`` (the logits likewise), alternating sliding-window layers
(``layer_types``, default: even layers slide), ``attention_bias`` (q, k, v and o),
``hidden_activation``, tied or untied head, every rope type. Refused: a null
``sliding_window`` (transformers fails on it), ``partial_rotary_factor`` other than 1, and
:func:`~lema.domain.nn.options.common_problems` (``use_bidirectional_attention``
included).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

import attrs

from lema.domain.families.family import Family
from lema.domain.nn import options as opt
from lema.domain.nn.decoder_layout import (
    ATTENTION_KEYS, GATED_MLP_KEYS, SANDWICH_NORMS, attention_biases, attention_weights,
    decoder_tensors, gated_mlp, head_dim, norm_weights, sandwich_dims,
)
from lema.domain.nn.decoder_io import SandwichParams, gemma_final_norm, scaled_embedding
from lema.domain.nn.layout import FULL, SLIDING, AttentionLayout, Dims, ExpectedTensor, ModelShape, PlanTerms
from lema.domain.nn.layout import config_int as _int
from lema.domain.nn.rope_config import standard_rope

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights

NAME = "gemma2"
MODULE_KEYS = ATTENTION_KEYS + GATED_MLP_KEYS


def _types(config: Mapping[str, Any], problems: list[str]) -> tuple[str, ...]:
    n = _int(config, "num_hidden_layers")
    return opt.layer_types(config, n, [SLIDING if (i + 1) % 2 else FULL for i in range(n)], problems)


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Gemma 2 config dict (options checked)."""
    return sandwich_dims(config, NAME, max_positions=8192, layer_types=_types, check_ropes=standard_rope)


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Gemma 2 model with this config has, grouped into units."""
    layer = norm_weights(d, *SANDWICH_NORMS) + attention_weights(d) + gated_mlp(d)
    if d.attention_bias:
        layer += attention_biases(d)
    return decoder_tensors(d, [layer] * d.n_layers)


@attrs.frozen(kw_only=True)
class Params(SandwichParams):
    """What a Gemma 2 layer reads beyond Gemma's: the attention scores' soft-cap."""

    attn_softcap: float | None


def params(config: Mapping[str, Any]) -> Params:
    """What a Gemma 2 layer reads from its config (the registry caches it per config)."""
    types = _types(config, [])
    rope = standard_rope(config, head_dim(config, 256))
    window = opt.window({"sliding_window": config.get("sliding_window", 4096)})
    return Params(layout=AttentionLayout(types, window, ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-6)),
                  activation=str(config.get("hidden_activation") or "gelu_pytorch_tanh"),
                  head_dim=head_dim(config, 256), hidden=_int(config, "hidden_size"),
                  scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
                  attn_softcap=config.get("attn_logit_softcapping", 50.0),
                  final_softcap=config.get("final_logit_softcapping", 30.0))


def plan_terms(model: ModelShape) -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: two post-norms; eager scores when soft-capped."""
    return PlanTerms(post_norm_width=2 * model.hidden_size,
                     eager_scores=params(json.loads(model.config_json)).attn_softcap is not None)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Gemma2DecoderLayer``): sandwich norms, soft-capped attention scores."""
    from lema.domain.nn import decoder_block, linear

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    return decoder_block.sandwich_layer(p, w, proj, x, ctx, layer, kv_hook, scale=p.scale, softcap=p.attn_softcap)


FAMILY = Family(name=NAME, model_types=("gemma2",), module_keys=MODULE_KEYS, dims=dims,
                expected_tensors=expected_tensors, params=params, embed=scaled_embedding, block=block,
                final_norm=gemma_final_norm, plan_terms=plan_terms)
