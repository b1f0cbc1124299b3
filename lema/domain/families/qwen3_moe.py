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
:func:`~lema.domain.model.options.common_problems`.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, Mapping

import attrs

from lema.domain.model import options as opt
from lema.domain.model.decoder_io import rms_final_norm, token_embedding
from lema.domain.model.decoder_layout import (
    attention_biases, attention_weights, decoder_dims, decoder_tensors, gated_mlp, norm_weights, qk_norms,
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

NAME = "qwen3_moe"
MODEL_TYPES = ("qwen3_moe",)
MODULE_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
TARGETS = tuple(k.split(".")[-1] for k in MODULE_KEYS)
DEFAULT_TARGETS = TARGETS
PEFT_PREFIX = "base_model.model.model.layers."
CONV1D = False
EXPERTS = True


@attrs.frozen
class Params:
    """What the blocks read from the config."""

    layout: AttentionLayout
    eps: float
    activation: str
    head_dim: int
    n_experts: int
    top_k: int
    renormalize: bool
    sparse: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP
    final_softcap: float | None = None


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or _int(config, "hidden_size") // _int(config, "num_attention_heads"))


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
    standard_rope(config, _head_dim(config))
    moe = _int(config, "moe_intermediate_size", default=768)
    dense = _int(config, "intermediate_size", default=6144) if not all(_sparse(config)) else moe
    return decoder_dims(config, NAME, _head_dim(config), max_positions=32768, intermediate_size=dense,
                        n_experts=_experts(config), experts_per_token=_int(config, "num_experts_per_tok", default=8),
                        expert_intermediate_size=moe)


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's non-zero dropouts, which LEMA does not apply: ``attention_dropout``."""
    return opt.nonzero_dropouts(config, ("attention_dropout", 0.0))


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Qwen3-MoE model with this config has, grouped into units (experts per expert)."""
    attention = (norm_weights(d, "input_layernorm") + attention_weights(d) + qk_norms(d.head_dim, d.head_dim)
                 + norm_weights(d, "post_attention_layernorm") + (attention_biases(d) if d.attention_bias else []))
    dense = gated_mlp(d, width=_int(config, "intermediate_size", default=6144))
    routed = [("mlp.gate.weight", (d.n_experts, d.hidden_size))]
    for e in range(d.n_experts):
        routed += gated_mlp(d, f"mlp.experts.{e}.", d.expert_intermediate_size)
    return decoder_tensors(d, [attention + (routed if sparse else dense) for sparse in _sparse(config)])


@functools.lru_cache(maxsize=32)
def params(config_json: str) -> Params:
    """The block parameters of a config (``ModelSpec.config_json``), cached."""
    config = json.loads(config_json)
    window = opt.window(config) if config.get("use_sliding_window", False) else None
    rope = standard_rope(config, _head_dim(config))
    return Params(layout=AttentionLayout((SLIDING if window else FULL,) * _int(config, "num_hidden_layers"), window,
                                         ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-6)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=_head_dim(config), n_experts=_experts(config),
                  top_k=_int(config, "num_experts_per_tok", default=8),
                  renormalize=bool(config.get("norm_topk_prob", False)), sparse=_sparse(config))


def plan_terms(spec: "ModelSpec") -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: q/k norms (per head)."""
    return PlanTerms(qk_norm_width=(spec.n_heads + spec.n_kv_heads) * spec.head_dim)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Qwen3MoeDecoderLayer``)."""
    from lema.domain.model import attention, linear, moe, norms

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    batch, seq, _ = x.shape
    h = norms.rms_norm(x, w["input_layernorm.weight"], p.eps)
    q = norms.rms_norm(proj(h, "self_attn.q_proj").view(batch, seq, -1, p.head_dim), w["self_attn.q_norm.weight"],
                       p.eps)
    k = norms.rms_norm(proj(h, "self_attn.k_proj").view(batch, seq, -1, p.head_dim), w["self_attn.k_norm.weight"],
                       p.eps)
    v = proj(h, "self_attn.v_proj").view(batch, seq, -1, p.head_dim)
    a = attention.self_attention(q, k, v, ctx, p.layout.layer_types[layer], scale=p.head_dim ** -0.5,
                                 kv_hook=kv_hook)
    x = x + proj(a, "self_attn.o_proj")
    h = norms.rms_norm(x, w["post_attention_layernorm.weight"], p.eps)
    act = norms.activation(p.activation)
    if not p.sparse[layer]:
        return x + proj(act(proj(h, "mlp.gate_proj")) * proj(h, "mlp.up_proj"), "mlp.down_proj")

    def expert(e: int) -> tuple:
        base = f"mlp.experts.{e}."
        return w[base + "gate_proj.weight"], w[base + "up_proj.weight"], w[base + "down_proj.weight"]

    return x + moe.routed_experts(h, w["mlp.gate.weight"], expert, p.n_experts, p.top_k, act, ctx,
                                  renormalize=p.renormalize, weights_in_hidden_dtype=True)


embed = token_embedding
final_norm = rms_final_norm
