"""Phi-3 and Phi-4 (``phi3``): fused ``qkv_proj`` and ``gate_up_proj``, partial rotary, LongRoPE.

The fused projections are stored and adapted as transformers and peft see them: LoRA
targets ``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj`` (rows ``[q | k | v]`` and
``[gate | up]``). Options, as ``Phi3Config`` defines them: ``partial_rotary_factor``
(only the first ``head_dim * factor`` dimensions rotate), rope type ``default`` or
``longrope`` (legacy ``su`` / ``yarn`` mean longrope; the short or long factors chosen by
the batch's longest position against ``original_max_position_embeddings``, default 4096),
``sliding_window`` on every layer when set, tied or untied head. Refused: other rope
types (transformers refuses them too) and
:func:`~lema.domain.nn.options.common_problems`. The base model's ``resid_pdrop`` /
``embd_pdrop`` dropouts are not applied. ``phi3small`` and ``phimoe`` are other model types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import attrs

from lema.domain.families.family import Family
from lema.domain.nn import options as opt
from lema.domain.nn.decoder_io import DecoderParams, rms_final_norm, token_embedding
from lema.domain.nn.decoder_layout import decoder_dims, decoder_tensors, head_dim, norm_weights
from lema.domain.nn.layout import FULL, SLIDING, AttentionLayout, Dims, ExpectedTensor, ModelShape, PlanTerms
from lema.domain.nn.layout import config_int as _int
from lema.domain.nn.rope_config import make_rope, rope_dict

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights
    from lema.domain.nn.rope_config import RopeSpec

NAME = "phi3"
MODULE_KEYS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _rope(config: Mapping[str, Any]) -> "RopeSpec":
    view = {"original_max_position_embeddings": 4096, **config}  # Phi3Config's default, which wins over the dict's
    rp = rope_dict(view)
    rp.setdefault("partial_rotary_factor", 1.0)
    if rp["rope_type"] in ("su", "yarn"):
        rp["rope_type"] = "longrope"
        rp["original_max_position_embeddings"] = view["original_max_position_embeddings"]
    if rp["rope_type"] not in ("default", "longrope"):
        opt.raise_problems(config, [opt.problem("rope_parameters.rope_type", rp["rope_type"],
                                                "is not implemented for phi3 (transformers accepts default or "
                                                "longrope)")])
    return make_rope(rp, config, head_dim(config), partial=True)


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Phi-3 config dict (options checked)."""
    opt.raise_problems(config, opt.common_problems(config, "hidden_act", "silu"))
    _rope(config)
    return decoder_dims(config, NAME, head_dim(config), max_positions=4096, attention_bias=False)


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's non-zero dropouts, which LEMA does not apply: ``attention_dropout`` and ``resid_pdrop`` (``embd_pdrop`` is unused by transformers too)."""
    return opt.nonzero_dropouts(config, ("attention_dropout", 0.0), ("resid_pdrop", 0.0))


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Phi-3 model with this config has, grouped into units."""
    h, q, kv, ff = d.hidden_size, d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim, d.intermediate_size
    layer = norm_weights(d, "input_layernorm") + [
        ("self_attn.qkv_proj.weight", (q + 2 * kv, h)), ("self_attn.o_proj.weight", (h, q)),
        ("post_attention_layernorm.weight", (h,)),
        ("mlp.gate_up_proj.weight", (2 * ff, h)), ("mlp.down_proj.weight", (h, ff)),
    ]
    return decoder_tensors(d, [layer] * d.n_layers)


@attrs.frozen(kw_only=True)
class Params(DecoderParams):
    """What the blocks read from the config: a Llama layer's, and the widths of its fused projections."""

    q_size: int
    kv_size: int
    ffn: int


def params(config: Mapping[str, Any]) -> Params:
    """What a Phi-3 layer reads from its config (the registry caches it per config)."""
    window = opt.window(config)
    heads = _int(config, "num_attention_heads")
    hd = head_dim(config)
    rope = _rope(config)
    return Params(layout=AttentionLayout((SLIDING if window else FULL,) * _int(config, "num_hidden_layers"), window,
                                         ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-5)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=hd, q_size=heads * hd, kv_size=_int(config, "num_key_value_heads", default=heads) * hd,
                  ffn=_int(config, "intermediate_size"))


def plan_terms(model: ModelShape) -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: the fused qkv output."""
    return PlanTerms(fused_qkv=True)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Phi3DecoderLayer``)."""
    from lema.domain.nn import attention, linear, norms

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    batch, seq, _ = x.shape
    h = norms.rms_norm(x, w["input_layernorm.weight"], p.eps)
    qkv = proj(h, "self_attn.qkv_proj")
    q, k, v = (t.view(batch, seq, -1, p.head_dim) for t in qkv.split([p.q_size, p.kv_size, p.kv_size], dim=-1))
    a = attention.self_attention(q, k, v, ctx, p.layout.layer_types[layer], scale=p.head_dim ** -0.5,
                                 kv_hook=kv_hook)
    x = x + proj(a, "self_attn.o_proj")
    h = norms.rms_norm(x, w["post_attention_layernorm.weight"], p.eps)
    gate, up = proj(h, "mlp.gate_up_proj").split([p.ffn, p.ffn], dim=-1)
    return x + proj(up * norms.activation(p.activation)(gate), "mlp.down_proj")


# Phi-3: transformers drops the KV cache when generation crosses LongRoPE's original length.
FAMILY = Family(name=NAME, model_types=("phi3",), module_keys=MODULE_KEYS, dims=dims,
                expected_tensors=expected_tensors, params=params, embed=token_embedding, block=block,
                final_norm=rms_final_norm, base_dropouts=base_dropouts, plan_terms=plan_terms,
                longrope_cache_reset=True)
