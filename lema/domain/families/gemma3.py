"""Gemma 3 text (``gemma3_text``, ``Gemma3ForCausalLM``): Gemma 2 with a per-head ``1 + w``
norm on q and k, a local and a global rope, and no attention soft-capping.

Options, as ``Gemma3TextConfig`` defines them: ``head_dim`` (default 256),
``query_pre_attn_scalar``, ``final_logit_softcapping`` (default none), sliding-window
layers (``layer_types``, default: every layer but each ``sliding_window_pattern``-th,
pattern 6), ``rope_parameters`` per layer type (sliding: ``rope_local_base_freq``, default
1e4; full: ``rope_theta``, default 1e6, with ``rope_scaling`` if given; every rope type),
``attention_bias`` (q, k, v and o), ``hidden_activation``, tied or untied head.
``attn_logit_softcapping`` is accepted and, exactly as in transformers, not applied.
Refused: a null ``sliding_window`` with sliding layers, ``partial_rotary_factor`` other
than 1, and :func:`~lema.domain.nn.options.common_problems`
(``use_bidirectional_attention`` included). The multimodal ``gemma3`` model type
(``Gemma3ForConditionalGeneration``) is not this family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping


from lema.domain.families.family import Family
from lema.domain.nn import options as opt
from lema.domain.nn.decoder_layout import (
    ATTENTION_KEYS, GATED_MLP_KEYS, SANDWICH_NORMS, attention_biases, attention_weights,
    decoder_tensors, gated_mlp, head_dim, norm_weights, qk_norms, sandwich_dims,
)
from lema.domain.nn.decoder_io import SandwichParams, gemma_final_norm, scaled_embedding
from lema.domain.nn.layout import FULL, SLIDING, AttentionLayout, Dims, ExpectedTensor, ModelShape, PlanTerms
from lema.domain.nn.layout import config_int as _int
from lema.domain.nn.rope_config import gemma3_ropes

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights

NAME = "gemma3"
MODULE_KEYS = ATTENTION_KEYS + GATED_MLP_KEYS


def _types(config: Mapping[str, Any], problems: list[str]) -> tuple[str, ...]:
    n = _int(config, "num_hidden_layers")
    pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
    return opt.layer_types(config, n, [SLIDING if (i + 1) % pattern else FULL for i in range(n)], problems)


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a Gemma 3 text config dict (options checked)."""
    return sandwich_dims(config, NAME, max_positions=131072, layer_types=_types, check_ropes=gemma3_ropes)


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a Gemma 3 text model with this config has, grouped into units."""
    layer = norm_weights(d, *SANDWICH_NORMS) + attention_weights(d) + qk_norms(d.head_dim, d.head_dim) + gated_mlp(d)
    if d.attention_bias:
        layer += attention_biases(d)
    return decoder_tensors(d, [layer] * d.n_layers)


Params = SandwichParams


def params(config: Mapping[str, Any]) -> Params:
    """What a Gemma 3 layer reads from its config (the registry caches it per config)."""
    types = _types(config, [])
    ropes = gemma3_ropes(config, head_dim(config, 256))
    window = opt.window({"sliding_window": config.get("sliding_window", 4096)})
    return Params(layout=AttentionLayout(types, window, tuple(sorted(ropes.items()))),
                  eps=float(config.get("rms_norm_eps", 1e-6)),
                  activation=str(config.get("hidden_activation") or "gelu_pytorch_tanh"),
                  head_dim=head_dim(config, 256), hidden=_int(config, "hidden_size"),
                  scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
                  final_softcap=config.get("final_logit_softcapping"))


def plan_terms(model: ModelShape) -> PlanTerms:
    """What a layer keeps beyond a Llama layer's, for the memory plan: two post-norms and the q/k norms."""
    return PlanTerms(qk_norm_width=(model.n_heads + model.n_kv_heads) * model.head_dim,
                     post_norm_width=2 * model.hidden_size)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``Gemma3DecoderLayer``): sandwich norms, q and k normalised per head."""
    from lema.domain.nn import decoder_block, linear

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS)
    return decoder_block.sandwich_layer(p, w, proj, x, ctx, layer, kv_hook, scale=p.scale, qk_norm=True)


FAMILY = Family(name=NAME, model_types=("gemma3_text",), module_keys=MODULE_KEYS, dims=dims,
                expected_tensors=expected_tensors, params=params, embed=scaled_embedding, block=block,
                final_norm=gemma_final_norm, plan_terms=plan_terms)
