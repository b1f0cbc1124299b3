"""Gemma 2: scaled embeddings, ``1 + w`` RMSNorms around both sub-layers, GeGLU, soft-capping.

Options, as ``Gemma2Config`` defines them: ``head_dim`` (default 256),
``query_pre_attn_scalar`` (the scores' scale is its inverse square root),
``attn_logit_softcapping`` (scores capped by ``tanh(s / cap) * cap`` before the mask),
``final_logit_softcapping`` (the logits likewise), alternating sliding-window layers
(``layer_types``, default: even layers slide), ``attention_bias`` (q, k, v and o),
``hidden_activation``, tied or untied head, every rope type. Refused: a null
``sliding_window`` (transformers fails on it), ``partial_rotary_factor`` other than 1, and
:func:`~lema.domain.model.options.common_problems` (``use_bidirectional_attention``
included).
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, Mapping

import attrs

from lema.domain.model import options as opt
from lema.domain.model.decoder_layout import (
    attention_biases, attention_weights, decoder_dims, decoder_tensors, gated_mlp, norm_weights,
)
from lema.domain.model.layout import FULL, SLIDING, AttentionLayout, Dims, ExpectedTensor, PlanTerms
from lema.domain.model.layout import config_int as _int
from lema.domain.model.rope_config import standard_rope

if TYPE_CHECKING:
    import torch

    from lema.domain.model.attention import KVHook
    from lema.domain.model.context import BlockContext
    from lema.domain.model.linear import Adapters, Weights
    from lema.domain.model.spec import ModelSpec

NAME = "gemma2"
MODEL_TYPES = ("gemma2",)
MODULE_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS = tuple(k.split(".")[-1] for k in MODULE_KEYS)
DEFAULT_TARGETS = TARGETS
PEFT_PREFIX = "base_model.model.model.layers."
CONV1D = False
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


@attrs.frozen
class Params:
    """What the blocks read from the config."""

    layout: AttentionLayout
    eps: float
    activation: str
    head_dim: int
    hidden: int
    scale: float
    attn_softcap: float | None
    final_softcap: float | None


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or 256)


def _types(config: Mapping[str, Any], problems: list[str]) -> tuple[str, ...]:
    n = _int(config, "num_hidden_layers")
    return opt.layer_types(config, n, [SLIDING if (i + 1) % 2 else FULL for i in range(n)], problems)


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Gemma 2 config dict (options checked)."""
    problems = opt.common_problems(config, "hidden_activation", "gelu_pytorch_tanh")
    types = _types(config, problems)
    problems += opt.expect(config, "sliding_window", 4096, lambda v: v is not None or SLIDING not in types,
                           "is not implemented with sliding layers (transformers fails on it)")
    opt.raise_problems(config, problems)
    standard_rope(config, _head_dim(config))
    return decoder_dims(config, NAME, _head_dim(config), max_positions=8192, tied=True,
                        activation_key="hidden_activation", activation="gelu_pytorch_tanh")


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's non-zero dropouts, which LEMA does not apply: ``attention_dropout``."""
    return opt.nonzero_dropouts(config, ("attention_dropout", 0.0))


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Gemma 2 model with this config has, grouped into units."""
    layer = norm_weights(d, *_NORMS) + attention_weights(d) + gated_mlp(d)
    if d.attention_bias:
        layer += attention_biases(d)
    return decoder_tensors(d, [layer] * d.n_layers)


@functools.lru_cache(maxsize=32)
def params(config_json: str) -> Params:
    """The block parameters of a config (``ModelSpec.config_json``), cached."""
    config = json.loads(config_json)
    types = _types(config, [])
    rope = standard_rope(config, _head_dim(config))
    window = opt.window({"sliding_window": config.get("sliding_window", 4096)})
    return Params(layout=AttentionLayout(types, window, ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-6)),
                  activation=str(config.get("hidden_activation") or "gelu_pytorch_tanh"),
                  head_dim=_head_dim(config), hidden=_int(config, "hidden_size"),
                  scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
                  attn_softcap=config.get("attn_logit_softcapping", 50.0),
                  final_softcap=config.get("final_logit_softcapping", 30.0))


def plan_terms(spec: "ModelSpec") -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: two post-norms; eager scores when soft-capped."""
    return PlanTerms(post_norm_width=2 * spec.hidden_size,
                     eager_scores=params(spec.config_json).attn_softcap is not None)


def embed(p: Params, weights: "Weights", input_ids: "torch.Tensor", position_ids: "torch.Tensor",
          dtype: "torch.dtype") -> "torch.Tensor":
    """Token embeddings times ``sqrt(hidden)``, the factor rounded to ``dtype`` as transformers does."""
    import torch
    import torch.nn.functional as F

    return F.embedding(input_ids, weights["embed_tokens.weight"]).to(dtype) * torch.tensor(p.hidden ** 0.5).to(dtype)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Gemma2DecoderLayer``)."""
    from lema.domain.model import attention, linear, norms

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    batch, seq, _ = x.shape
    h = norms.rms_norm_gemma(x, w["input_layernorm.weight"], p.eps)
    q = proj(h, "self_attn.q_proj").view(batch, seq, -1, p.head_dim)
    k = proj(h, "self_attn.k_proj").view(batch, seq, -1, p.head_dim)
    v = proj(h, "self_attn.v_proj").view(batch, seq, -1, p.head_dim)
    a = attention.self_attention(q, k, v, ctx, p.layout.layer_types[layer], scale=p.scale, kv_hook=kv_hook,
                                 softcap=p.attn_softcap)
    x = x + norms.rms_norm_gemma(proj(a, "self_attn.o_proj"), w["post_attention_layernorm.weight"], p.eps)
    h = norms.rms_norm_gemma(x, w["pre_feedforward_layernorm.weight"], p.eps)
    act = norms.activation(p.activation)
    m = proj(act(proj(h, "mlp.gate_proj")) * proj(h, "mlp.up_proj"), "mlp.down_proj")
    return x + norms.rms_norm_gemma(m, w["post_feedforward_layernorm.weight"], p.eps)


def final_norm(p: Params, weights: "Weights", x: "torch.Tensor") -> "torch.Tensor":
    """The final ``1 + w`` RMSNorm (the logits are then soft-capped by ``final_softcap``)."""
    from lema.domain.model import norms

    return norms.rms_norm_gemma(x, weights["norm.weight"], p.eps)
