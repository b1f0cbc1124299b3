"""Qwen3 (dense): Llama with a per-head RMSNorm on q and k before the rotary embedding.

Options, as ``Qwen3Config`` defines them: ``head_dim`` (default 128, independent of hidden
/ heads), ``attention_bias`` (biases on q, k, v and o), tied or untied head, every rope
type, and sliding-window layers when ``use_sliding_window`` (from ``max_window_layers`` on,
or as ``layer_types`` says; transformers nulls the window otherwise). Refused:
``partial_rotary_factor`` other than 1, sliding layers without a window, and
:func:`~lema.domain.model.options.common_problems`.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, Mapping


from lema.domain.model import options as opt
from lema.domain.model.decoder_io import DecoderParams, rms_final_norm, token_embedding
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

NAME = "qwen3"
MODEL_TYPES = ("qwen3",)
MODULE_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS = tuple(k.split(".")[-1] for k in MODULE_KEYS)
DEFAULT_TARGETS = TARGETS
PEFT_PREFIX = "base_model.model.model.layers."
CONV1D = False


Params = DecoderParams


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or 128)


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
    standard_rope(config, _head_dim(config))
    return decoder_dims(config, NAME, _head_dim(config), max_positions=32768)


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's non-zero dropouts, which LEMA does not apply: ``attention_dropout``."""
    return opt.nonzero_dropouts(config, ("attention_dropout", 0.0))


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Qwen3 model with this config has, grouped into units."""
    layer = (norm_weights(d, "input_layernorm") + attention_weights(d) + qk_norms(d.head_dim, d.head_dim)
             + norm_weights(d, "post_attention_layernorm") + gated_mlp(d))
    if d.attention_bias:
        layer += attention_biases(d)
    return decoder_tensors(d, [layer] * d.n_layers)


@functools.lru_cache(maxsize=32)
def params(config_json: str) -> Params:
    """The block parameters of a config (``ModelSpec.config_json``), cached."""
    config = json.loads(config_json)
    types, window = _attention(config, [])
    rope = standard_rope(config, _head_dim(config))
    return Params(layout=AttentionLayout(types, window, ((FULL, rope), (SLIDING, rope))),
                  eps=float(config.get("rms_norm_eps", 1e-6)), activation=str(config.get("hidden_act") or "silu"),
                  head_dim=_head_dim(config))


def plan_terms(spec: "ModelSpec") -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: q/k norms (per head)."""
    return PlanTerms(qk_norm_width=(spec.n_heads + spec.n_kv_heads) * spec.head_dim)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Qwen3DecoderLayer``)."""
    from lema.domain.model import attention, linear, norms

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
    return x + proj(act(proj(h, "mlp.gate_proj")) * proj(h, "mlp.up_proj"), "mlp.down_proj")


embed = token_embedding
final_norm = rms_final_norm
