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
:func:`~lema.domain.model.options.common_problems`.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, Mapping

import attrs

from lema.domain.model import options as opt
from lema.domain.model.decoder_io import rms_final_norm, token_embedding
from lema.domain.model.decoder_layout import attention_weights, decoder_dims, decoder_tensors, norm_weights
from lema.domain.model.layout import FULL, SLIDING, AttentionLayout, Dims, ExpectedTensor, PlanTerms
from lema.domain.model.layout import config_int as _int
from lema.domain.model.rope_config import standard_rope

if TYPE_CHECKING:
    import torch

    from lema.domain.model.attention import KVHook
    from lema.domain.model.context import BlockContext
    from lema.domain.model.linear import Adapters, Weights
    from lema.domain.model.spec import ModelSpec

NAME = "mixtral"
MODEL_TYPES = ("mixtral",)
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
    final_softcap: float | None = None


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or _int(config, "hidden_size") // _int(config, "num_attention_heads"))


def _experts(config: Mapping[str, Any]) -> int:
    return _int(config, "num_local_experts", "num_experts", default=8)


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Mixtral config dict (options checked)."""
    problems = opt.common_problems(config, "hidden_act", "silu")
    problems += opt.expect(config, "output_router_logits", False, lambda v: not v,
                           "is not implemented (it adds the router's load-balancing loss); use false")
    problems += opt.expect(config, "router_jitter_noise", 0.0, lambda v: not v, "is not implemented; use 0")
    opt.raise_problems(config, problems)
    standard_rope(config, _head_dim(config), default_theta=1_000_000.0)
    ff = _int(config, "intermediate_size")
    return decoder_dims(config, NAME, _head_dim(config), max_positions=131072, attention_bias=False,
                        intermediate_size=ff, n_experts=_experts(config),
                        experts_per_token=_int(config, "num_experts_per_tok", default=2), expert_intermediate_size=ff)


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's non-zero dropouts, which LEMA does not apply: ``attention_dropout``."""
    return opt.nonzero_dropouts(config, ("attention_dropout", 0.0))


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Mixtral model with this config has, grouped into units (experts per expert)."""
    h, ff = d.hidden_size, d.intermediate_size
    layer = (norm_weights(d, "input_layernorm") + attention_weights(d) + norm_weights(d, "post_attention_layernorm")
             + [("block_sparse_moe.gate.weight", (d.n_experts, h))])
    for e in range(d.n_experts):
        p = f"block_sparse_moe.experts.{e}."
        layer += [(p + "w1.weight", (ff, h)), (p + "w3.weight", (ff, h)), (p + "w2.weight", (h, ff))]
    return decoder_tensors(d, [layer] * d.n_layers)


@functools.lru_cache(maxsize=32)
def params(config_json: str) -> Params:
    """The block parameters of a config (``ModelSpec.config_json``), cached."""
    config = json.loads(config_json)
    window = opt.window(config)
    rope = standard_rope(config, _head_dim(config), default_theta=1_000_000.0)
    return Params(layout=AttentionLayout((SLIDING if window else FULL,) * _int(config, "num_hidden_layers"), window,
                                         ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-5)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=_head_dim(config), n_experts=_experts(config),
                  top_k=_int(config, "num_experts_per_tok", default=2))


def plan_terms(spec: "ModelSpec") -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: fp32 routing weights."""
    return PlanTerms(router_fp32=True)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``MixtralDecoderLayer``)."""
    from lema.domain.model import attention, linear, moe, norms

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    batch, seq, _ = x.shape
    h = norms.rms_norm(x, w["input_layernorm.weight"], p.eps)
    q, k, v = (proj(h, f"self_attn.{n}_proj").view(batch, seq, -1, p.head_dim) for n in "qkv")
    a = attention.self_attention(q, k, v, ctx, p.layout.layer_types[layer], scale=p.head_dim ** -0.5,
                                 kv_hook=kv_hook)
    x = x + proj(a, "self_attn.o_proj")
    h = norms.rms_norm(x, w["post_attention_layernorm.weight"], p.eps)

    def expert(e: int) -> tuple:
        base = f"block_sparse_moe.experts.{e}."
        return w[base + "w1.weight"], w[base + "w3.weight"], w[base + "w2.weight"]

    return x + moe.routed_experts(h, w["block_sparse_moe.gate.weight"], expert, p.n_experts, p.top_k,
                                  norms.activation(p.activation), ctx, renormalize=True,
                                  weights_in_hidden_dtype=False)


embed = token_embedding
final_norm = rms_final_norm
