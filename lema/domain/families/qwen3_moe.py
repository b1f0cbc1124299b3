"""Qwen3-MoE (``qwen3_moe``): Qwen3 attention and a top-k routed mixture of SwiGLU experts.

The experts are read as transformers 5 writes them: per-expert tensors
``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` and the router ``mlp.gate``;
layers in ``mlp_only_layers`` (or off the ``decoder_sparse_step``) have a dense MLP. There
is no shared expert. Routing: softmax over all experts in fp32, top
``num_experts_per_tok``, renormalised only with ``norm_topk_prob``, weights cast to the
activations' dtype. LoRA adapts the attention projections (the default: q, k, v and o);
LoRA on the experts, the router or the dense MLPs is not implemented (peft rewrites those
names into expert parameters), so ``all-linear`` is refused. Options: ``num_experts``
(alias ``num_local_experts``), ``moe_intermediate_size``, ``intermediate_size`` (dense
layers), ``head_dim`` (honoured when present), ``attention_bias`` (q, k, v and o), a
sliding window on every layer when ``use_sliding_window``, every rope type, tied or
untied head. Refused: ``output_router_logits``, ``partial_rotary_factor`` other than 1, and
:func:`~lema.domain.nn.options.common_problems`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import attrs

from lema.domain.families.family import Family
from lema.domain.nn import options as opt
from lema.domain.nn.decoder_io import DecoderParams, rms_final_norm, token_embedding
from lema.domain.nn.decoder_layout import (
    ATTENTION_KEYS, attention_biases, attention_weights, decoder_dims, decoder_tensors, gated_mlp, head_dim,
    norm_weights, qk_norms,
)
from lema.domain.nn.layout import FULL, SLIDING, AttentionLayout, Dims, ExpectedTensor, ModelShape, PlanTerms
from lema.domain.nn.layout import config_int as _int
from lema.domain.nn.rope_config import standard_rope

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights

NAME = "qwen3_moe"
MODULE_KEYS = ATTENTION_KEYS  # LoRA on the experts and the router is not implemented


def _experts(config: Mapping[str, Any]) -> int:
    value = config.get("num_experts", config.get("num_local_experts", 128))
    return 0 if value == 0 else _int({"num_experts": value}, "num_experts")


def _sparse(config: Mapping[str, Any]) -> tuple[bool, ...]:
    dense, step = set(config.get("mlp_only_layers") or []), int(config.get("decoder_sparse_step", 1) or 1)
    return tuple(i not in dense and _experts(config) > 0 and (i + 1) % step == 0
                 for i in range(_int(config, "num_hidden_layers")))


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Qwen3-MoE config dict (options checked)."""
    problems = opt.common_problems(config, "hidden_act", "silu")
    problems += opt.expect(config, "output_router_logits", False, lambda v: not v,
                           "is not implemented (it adds the router's load-balancing loss); use false")
    opt.raise_problems(config, problems)
    standard_rope(config, head_dim(config))
    moe = _int(config, "moe_intermediate_size", default=768)
    dense = _int(config, "intermediate_size", default=6144) if not all(_sparse(config)) else moe
    return decoder_dims(config, NAME, head_dim(config), max_positions=32768, intermediate_size=dense,
                        n_experts=_experts(config), experts_per_token=_int(config, "num_experts_per_tok", default=8),
                        expert_intermediate_size=moe)


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Qwen3-MoE model with this config has, grouped into units (experts per expert)."""
    attention = (norm_weights(d, "input_layernorm") + attention_weights(d) + qk_norms(d.head_dim, d.head_dim)
                 + norm_weights(d, "post_attention_layernorm") + (attention_biases(d) if d.attention_bias else []))
    dense = gated_mlp(d, width=_int(config, "intermediate_size", default=6144))
    routed: list[tuple[str, tuple[int, ...]]] = [("mlp.gate.weight", (d.n_experts, d.hidden_size))]
    for e in range(d.n_experts):
        routed += gated_mlp(d, f"mlp.experts.{e}.", d.expert_intermediate_size)
    return decoder_tensors(d, [attention + (routed if sparse else dense) for sparse in _sparse(config)])


@attrs.frozen(kw_only=True)
class Params(DecoderParams):
    """What the blocks read from the config: a Llama layer's, and its experts'."""

    n_experts: int
    top_k: int
    renormalize: bool
    sparse: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP


def params(config: Mapping[str, Any]) -> Params:
    """What a Qwen3-MoE layer reads from its config (the registry caches it per config)."""
    window = opt.window(config) if config.get("use_sliding_window", False) else None
    rope = standard_rope(config, head_dim(config))
    return Params(layout=AttentionLayout((SLIDING if window else FULL,) * _int(config, "num_hidden_layers"), window,
                                         ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-6)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=head_dim(config), n_experts=_experts(config),
                  top_k=_int(config, "num_experts_per_tok", default=8),
                  renormalize=bool(config.get("norm_topk_prob", False)), sparse=_sparse(config))


def plan_terms(model: ModelShape) -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: q/k norms (per head)."""
    return PlanTerms(qk_norm_width=(model.n_heads + model.n_kv_heads) * model.head_dim)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Qwen3MoeDecoderLayer``): Qwen3's attention, routed experts or a dense MLP."""
    from lema.domain.nn import decoder_block, linear, moe, norms

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    if not p.sparse[layer]:
        return decoder_block.pre_norm_layer(p, w, proj, x, ctx, layer, kv_hook, qk_norm=True)

    def expert(e: int) -> tuple:
        base = f"mlp.experts.{e}."
        return w[base + "gate_proj.weight"], w[base + "up_proj.weight"], w[base + "down_proj.weight"]

    def experts(h: "torch.Tensor") -> "torch.Tensor":
        return moe.routed_experts(h, w["mlp.gate.weight"], expert, p.n_experts, p.top_k, norms.activation(p.activation),
                                  ctx, renormalize=p.renormalize, weights_in_hidden_dtype=True)

    return decoder_block.pre_norm_layer(p, w, proj, x, ctx, layer, kv_hook, qk_norm=True, mlp=experts)


FAMILY = Family(name=NAME, model_types=("qwen3_moe",), module_keys=MODULE_KEYS, dims=dims,
                expected_tensors=expected_tensors, params=params, embed=token_embedding, block=block,
                final_norm=rms_final_norm, plan_terms=plan_terms, experts=True)
