"""OLMo 2 (``olmo2``): no pre-norms; RMSNorms on the sub-layers' outputs and on the full q and k.

The q and k norms run over the whole projected width (``heads * head_dim``) before the
heads are split; the norms scale in fp32 and cast last; the rotary tables stay fp32 and
the rotated q and k are cast back. Options, as ``Olmo2Config`` defines them:
``attention_bias`` (q, k, v and o), tied or untied head, every rope type. Refused:
``partial_rotary_factor`` other than 1 and
:func:`~lema.domain.nn.options.common_problems`. peft has no default targets for OLMo 2;
LEMA's default is every projection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping


from lema.domain.families.family import Family
from lema.domain.nn import options as opt
from lema.domain.nn.decoder_io import DecoderParams, token_embedding
from lema.domain.nn.decoder_layout import (
    ATTENTION_KEYS, GATED_MLP_KEYS, attention_biases, attention_weights, decoder_dims, decoder_tensors, gated_mlp,
    head_dim, norm_weights, qk_norms,
)
from lema.domain.nn.layout import FULL, AttentionLayout, Dims, ExpectedTensor, ModelShape, PlanTerms
from lema.domain.nn.layout import config_int as _int
from lema.domain.nn.rope_config import standard_rope

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights

NAME = "olmo2"
MODULE_KEYS = ATTENTION_KEYS + GATED_MLP_KEYS


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of an OLMo 2 config dict (options checked)."""
    opt.raise_problems(config, opt.common_problems(config, "hidden_act", "silu"))
    standard_rope(config, head_dim(config))
    return decoder_dims(config, NAME, head_dim(config), max_positions=2048)


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor an OLMo 2 model with this config has, grouped into units."""
    layer = (attention_weights(d) + qk_norms(d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim)
             + norm_weights(d, "post_attention_layernorm") + gated_mlp(d)
             + norm_weights(d, "post_feedforward_layernorm"))
    if d.attention_bias:
        layer += attention_biases(d)
    return decoder_tensors(d, [layer] * d.n_layers)


def params(config: Mapping[str, Any]) -> DecoderParams:
    """What an OLMo 2 layer reads from its config (the registry caches it per config)."""
    rope = standard_rope(config, head_dim(config))
    return DecoderParams(layout=AttentionLayout((FULL,) * _int(config, "num_hidden_layers"), None, ((FULL, rope),),
                                         rope_fp32=True),
                  eps=float(config.get("rms_norm_eps", 1e-5)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=head_dim(config))


def plan_terms(model: ModelShape) -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: q/k norms over the full width."""
    return PlanTerms(qk_norm_width=(model.n_heads + model.n_kv_heads) * model.head_dim)


def block(p: DecoderParams, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Olmo2DecoderLayer``)."""
    from lema.domain.nn import attention, decoder_block, layout, linear, norms

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    batch, seq, _ = x.shape
    q, k, v = proj.many(x, layout.QKV)
    q = norms.rms_norm_fp32_scale(q, w["self_attn.q_norm.weight"], p.eps)
    k = norms.rms_norm_fp32_scale(k, w["self_attn.k_norm.weight"], p.eps)
    q, k, v = (t.view(batch, seq, -1, p.head_dim) for t in (q, k, v))
    a = attention.self_attention(q, k, v, ctx, FULL, scale=p.head_dim ** -0.5, kv_hook=kv_hook)
    x = x + norms.rms_norm_fp32_scale(proj(a, "self_attn.o_proj"), w["post_attention_layernorm.weight"], p.eps)
    m = decoder_block.swiglu(proj, x, p.activation)
    return x + norms.rms_norm_fp32_scale(m, w["post_feedforward_layernorm.weight"], p.eps)


def final_norm(p: DecoderParams, weights: "Weights", x: "torch.Tensor") -> "torch.Tensor":
    """The final RMSNorm (scaled in fp32)."""
    from lema.domain.nn import norms

    return norms.rms_norm_fp32_scale(x, weights["norm.weight"], p.eps)


FAMILY = Family(name=NAME, model_types=("olmo2",), module_keys=MODULE_KEYS, dims=dims,
                expected_tensors=expected_tensors, params=params, embed=token_embedding, block=block,
                final_norm=final_norm, plan_terms=plan_terms)
