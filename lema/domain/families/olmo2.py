"""OLMo 2 (``olmo2``): no pre-norms; RMSNorms on the sub-layers' outputs and on the full q and k.

The q and k norms run over the whole projected width (``heads * head_dim``) before the
heads are split; the norms scale in fp32 and cast last; the rotary tables stay fp32 and
the rotated q and k are cast back. Options, as ``Olmo2Config`` defines them:
``attention_bias`` (q, k, v and o), tied or untied head, every rope type. Refused:
``partial_rotary_factor`` other than 1 and
:func:`~lema.domain.model.options.common_problems`. peft has no default targets for OLMo 2;
LEMA's default is every projection.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, Mapping


from lema.domain.model import options as opt
from lema.domain.model.decoder_io import DecoderParams, token_embedding
from lema.domain.model.decoder_layout import (
    attention_biases, attention_weights, decoder_dims, decoder_tensors, gated_mlp, norm_weights, qk_norms,
)
from lema.domain.model.layout import FULL, AttentionLayout, Dims, ExpectedTensor, PlanTerms
from lema.domain.model.layout import config_int as _int
from lema.domain.model.rope_config import standard_rope

if TYPE_CHECKING:
    import torch

    from lema.domain.model.attention import KVHook
    from lema.domain.model.context import BlockContext
    from lema.domain.model.linear import Adapters, Weights
    from lema.domain.model.spec import ModelSpec

NAME = "olmo2"
MODEL_TYPES = ("olmo2",)
MODULE_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS = tuple(k.split(".")[-1] for k in MODULE_KEYS)
DEFAULT_TARGETS = TARGETS
PEFT_PREFIX = "base_model.model.model.layers."
CONV1D = False


Params = DecoderParams


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or _int(config, "hidden_size") // _int(config, "num_attention_heads"))


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of an OLMo 2 config dict (options checked)."""
    opt.raise_problems(config, opt.common_problems(config, "hidden_act", "silu"))
    standard_rope(config, _head_dim(config))
    return decoder_dims(config, NAME, _head_dim(config), max_positions=2048)


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's non-zero dropouts, which LEMA does not apply: ``attention_dropout``."""
    return opt.nonzero_dropouts(config, ("attention_dropout", 0.0))


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor an OLMo 2 model with this config has, grouped into units."""
    layer = (attention_weights(d) + qk_norms(d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim)
             + norm_weights(d, "post_attention_layernorm") + gated_mlp(d)
             + norm_weights(d, "post_feedforward_layernorm"))
    if d.attention_bias:
        layer += attention_biases(d)
    return decoder_tensors(d, [layer] * d.n_layers)


@functools.lru_cache(maxsize=32)
def params(config_json: str) -> Params:
    """The block parameters of a config (``ModelSpec.config_json``), cached."""
    config = json.loads(config_json)
    rope = standard_rope(config, _head_dim(config))
    return Params(layout=AttentionLayout((FULL,) * _int(config, "num_hidden_layers"), None, ((FULL, rope),),
                                         rope_fp32=True),
                  eps=float(config.get("rms_norm_eps", 1e-5)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=_head_dim(config))


def plan_terms(spec: "ModelSpec") -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: q/k norms over the full width."""
    return PlanTerms(qk_norm_width=(spec.n_heads + spec.n_kv_heads) * spec.head_dim)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Olmo2DecoderLayer``)."""
    from lema.domain.model import attention, linear, norms

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    batch, seq, _ = x.shape
    q = norms.rms_norm_fp32_scale(proj(x, "self_attn.q_proj"), w["self_attn.q_norm.weight"], p.eps)
    k = norms.rms_norm_fp32_scale(proj(x, "self_attn.k_proj"), w["self_attn.k_norm.weight"], p.eps)
    v = proj(x, "self_attn.v_proj")
    q, k, v = (t.view(batch, seq, -1, p.head_dim) for t in (q, k, v))
    a = attention.self_attention(q, k, v, ctx, FULL, scale=p.head_dim ** -0.5, kv_hook=kv_hook)
    x = x + norms.rms_norm_fp32_scale(proj(a, "self_attn.o_proj"), w["post_attention_layernorm.weight"], p.eps)
    act = norms.activation(p.activation)
    m = proj(act(proj(x, "mlp.gate_proj")) * proj(x, "mlp.up_proj"), "mlp.down_proj")
    return x + norms.rms_norm_fp32_scale(m, w["post_feedforward_layernorm.weight"], p.eps)


def final_norm(p: Params, weights: "Weights", x: "torch.Tensor") -> "torch.Tensor":
    """The final RMSNorm (scaled in fp32)."""
    from lema.domain.model import norms

    return norms.rms_norm_fp32_scale(x, weights["norm.weight"], p.eps)


embed = token_embedding
