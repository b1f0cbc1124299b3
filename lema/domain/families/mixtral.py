"""Mixtral (``mixtral``): Mistral attention and a top-k routed mixture of SwiGLU experts in every layer.

The experts are read as transformers 5 writes them: per-expert tensors
``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down) and the router
``block_sparse_moe.gate``. Routing: softmax over all experts in fp32, top
``num_experts_per_tok``, always renormalised, weights kept fp32. LoRA adapts the attention
projections (the default: q, k, v and o); LoRA on the experts or the router is not
implemented, so ``all-linear`` (which in peft adapts them) is refused. Options:
``num_local_experts`` (alias ``num_experts``), ``num_experts_per_tok``, ``head_dim``,
``sliding_window`` on every layer when set, every rope type (default base 1e6), tied or
untied head. Refused: ``output_router_logits`` (adds the load-balancing loss),
``router_jitter_noise`` other than 0, ``partial_rotary_factor`` other than 1, and
:func:`~lema.domain.nn.options.common_problems`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import attrs

from lema.domain.families.family import Family
from lema.domain.nn import options as opt
from lema.domain.nn.decoder_io import DecoderParams, rms_final_norm, token_embedding
from lema.domain.nn.decoder_layout import (
    ATTENTION_KEYS, attention_weights, decoder_dims, decoder_tensors, head_dim, norm_weights,
)
from lema.domain.nn.layout import FULL, SLIDING, AttentionLayout, Dims, ExpectedTensor, ModelShape, PlanTerms
from lema.domain.nn.layout import config_int as _int
from lema.domain.nn.rope_config import standard_rope

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights

NAME = "mixtral"
MODULE_KEYS = ATTENTION_KEYS  # LoRA on the experts and the router is not implemented


def _experts(config: Mapping[str, Any]) -> int:
    return _int(config, "num_local_experts", "num_experts", default=8)


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Mixtral config dict (options checked)."""
    problems = opt.common_problems(config, "hidden_act", "silu")
    problems += opt.expect(config, "output_router_logits", False, lambda v: not v,
                           "is not implemented (it adds the router's load-balancing loss); use false")
    problems += opt.expect(config, "router_jitter_noise", 0.0, lambda v: not v, "is not implemented; use 0")
    opt.raise_problems(config, problems)
    standard_rope(config, head_dim(config), default_theta=1_000_000.0)
    ff = _int(config, "intermediate_size")
    return decoder_dims(config, NAME, head_dim(config), max_positions=131072, attention_bias=False,
                        intermediate_size=ff, n_experts=_experts(config),
                        experts_per_token=_int(config, "num_experts_per_tok", default=2), expert_intermediate_size=ff)


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Mixtral model with this config has, grouped into units (experts per expert)."""
    h, ff = d.hidden_size, d.intermediate_size
    layer = (norm_weights(d, "input_layernorm") + attention_weights(d) + norm_weights(d, "post_attention_layernorm")
             + [("block_sparse_moe.gate.weight", (d.n_experts, h))])
    for e in range(d.n_experts):
        p = f"block_sparse_moe.experts.{e}."
        layer += [(p + "w1.weight", (ff, h)), (p + "w3.weight", (ff, h)), (p + "w2.weight", (h, ff))]
    return decoder_tensors(d, [layer] * d.n_layers)


@attrs.frozen(kw_only=True)
class Params(DecoderParams):
    """What the blocks read from the config: a Llama layer's, and its experts'."""

    n_experts: int
    top_k: int


def params(config: Mapping[str, Any]) -> Params:
    """What a Mixtral layer reads from its config (the registry caches it per config)."""
    window = opt.window(config)
    rope = standard_rope(config, head_dim(config), default_theta=1_000_000.0)
    return Params(layout=AttentionLayout((SLIDING if window else FULL,) * _int(config, "num_hidden_layers"), window,
                                         ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-5)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=head_dim(config), n_experts=_experts(config),
                  top_k=_int(config, "num_experts_per_tok", default=2))


def plan_terms(model: ModelShape) -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: fp32 routing weights."""
    return PlanTerms(router_fp32=True)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``MixtralDecoderLayer``): Llama's attention, routed experts."""
    from lema.domain.nn import decoder_block, linear, moe, norms

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)

    def expert(e: int) -> tuple:
        base = f"block_sparse_moe.experts.{e}."
        return w[base + "w1.weight"], w[base + "w3.weight"], w[base + "w2.weight"]

    def experts(h: "torch.Tensor") -> "torch.Tensor":
        return moe.routed_experts(h, w["block_sparse_moe.gate.weight"], expert, p.n_experts, p.top_k,
                                  norms.activation(p.activation), ctx, renormalize=True, weights_in_hidden_dtype=False)

    return decoder_block.pre_norm_layer(p, w, proj, x, ctx, layer, kv_hook, mlp=experts)


FAMILY = Family(name=NAME, model_types=("mixtral",), module_keys=MODULE_KEYS, dims=dims,
                expected_tensors=expected_tensors, params=params, embed=token_embedding, block=block,
                final_norm=rms_final_norm, plan_terms=plan_terms, experts=True)
