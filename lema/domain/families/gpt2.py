"""The GPT-2 family (LayerNorm, learned positions, Conv1D ``[in, out]`` weights, GELU, tied head).

Options: ``activation_function``, ``layer_norm_epsilon``, ``n_inner``,
``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``, tied or untied head; the
original OpenAI layout without the ``transformer.`` prefix is read too. Refused:
``add_cross_attention`` and ``reorder_and_upcast_attn`` (not implemented), and
:func:`~lema.domain.nn.options.common_problems`. The base model's dropouts
(``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop``) are not applied: only LoRA dropout is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import attrs

from lema.domain.families.family import Family
from lema.domain.nn import options as opt
from lema.domain.nn.config_values import check_gpt2_fields
from lema.domain.nn.decoder_io import DecoderParams
from lema.domain.nn.layout import FULL, AttentionLayout, Dims, ExpectedTensor, LayerFormulas, ModelShape, PlanTerms
from lema.domain.nn.layout import config_int as _int

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights

NAME = "gpt2"
MODULE_KEYS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def check(config: Mapping[str, Any]) -> None:
    """Refuse, by name and value, every option this family does not implement."""
    problems = opt.common_problems(config, "activation_function", "gelu_new")
    for key in ("add_cross_attention", "reorder_and_upcast_attn"):
        problems += opt.expect(config, key, False, lambda v: not v, "is not implemented")
    opt.raise_problems(config, problems)


def dims(config: Mapping[str, Any]) -> Dims:
    """Read the dimensions of a GPT-2 config dict (options checked)."""
    check(config)
    hidden = _int(config, "n_embd", "hidden_size")
    heads = _int(config, "n_head", "num_attention_heads")
    return Dims(
        family=NAME, model_type=str(config["model_type"]).lower(),
        n_layers=_int(config, "n_layer", "num_hidden_layers"), hidden_size=hidden,
        n_heads=heads, n_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=_int(config, "n_inner", default=4 * hidden),
        vocab_size=_int(config, "vocab_size"), tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        attention_bias=True, max_positions=_int(config, "n_positions", "n_ctx", default=1024),
        activation=str(config.get("activation_function") or "gelu_new"),
    )


# transformers' GPT2Config defaults: a config without these keys trains with 0.1 each.
BASE_DROPOUTS = (("embd_pdrop", 0.1), ("attn_pdrop", 0.1), ("resid_pdrop", 0.1))


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's own dropout probabilities that are not zero (LEMA does not apply them)."""
    return opt.nonzero_dropouts(config, *BASE_DROPOUTS)


def expected_tensors(d: Dims, config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a GPT-2 model has; the ``transformer.`` prefix (transformers' layout) unless
    ``names`` (the file's tensor names) use the original OpenAI layout without it."""
    p = "" if names is not None and "wte.weight" in names and "transformer.wte.weight" not in names else "transformer."
    h, ff = d.hidden_size, d.intermediate_size
    out = [
        ExpectedTensor(0, "wte.weight", (p + "wte.weight",), (d.vocab_size, h)),
        ExpectedTensor(0, "wpe.weight", (p + "wpe.weight",), (d.max_positions, h)),
    ]
    for i in range(d.n_layers):
        layer = [
            ("ln_1.weight", (h,)), ("ln_1.bias", (h,)),
            ("attn.c_attn.weight", (h, 3 * h)), ("attn.c_attn.bias", (3 * h,)),
            ("attn.c_proj.weight", (h, h)), ("attn.c_proj.bias", (h,)),
            ("ln_2.weight", (h,)), ("ln_2.bias", (h,)),
            ("mlp.c_fc.weight", (h, ff)), ("mlp.c_fc.bias", (ff,)),
            ("mlp.c_proj.weight", (ff, h)), ("mlp.c_proj.bias", (h,)),
        ]
        out += [ExpectedTensor(i + 1, key, (f"{p}h.{i}.{key}",), shape) for key, shape in layer]
    head = d.n_layers + 1
    tied = (p + "wte.weight",) if d.tied_embeddings else ()
    out += [
        ExpectedTensor(head, "ln_f.weight", (p + "ln_f.weight",), (h,)),
        ExpectedTensor(head, "ln_f.bias", (p + "ln_f.bias",), (h,)),
        ExpectedTensor(head, "lm_head.weight", ("lm_head.weight", *tied), (d.vocab_size, h)),
    ]
    return out


@attrs.frozen(kw_only=True)
class Params(DecoderParams):
    """What the blocks read from the config: its norms' epsilon, head width and attention scaling."""

    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool


def params(config: Mapping[str, Any]) -> Params:
    """What a GPT-2 layer reads from its config (the registry caches it per config)."""
    hidden = _int(config, "n_embd", "hidden_size")
    return Params(layout=AttentionLayout((FULL,) * _int(config, "n_layer", "num_hidden_layers")),
                  eps=float(config.get("layer_norm_epsilon", 1e-5)),
                  activation=str(config.get("activation_function") or "gelu_new"),
                  head_dim=hidden // _int(config, "n_head", "num_attention_heads"),
                  scale_attn_weights=bool(config.get("scale_attn_weights", True)),
                  scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)))


def embed(p: Params, weights: "Weights", input_ids: "torch.Tensor", position_ids: "torch.Tensor",
          dtype: "torch.dtype") -> "torch.Tensor":
    """Token plus learned position embeddings."""
    import torch.nn.functional as F

    return F.embedding(input_ids, weights["wte.weight"]).to(dtype) + F.embedding(position_ids,
                                                                                 weights["wpe.weight"]).to(dtype)


def block(p: Params, w: "Weights", lora: "Adapters | None", x: "torch.Tensor", ctx: "BlockContext", layer: int,
          kv_hook: "KVHook | None" = None) -> "torch.Tensor":
    """One decoder layer (``GPT2Block``)."""
    from lema.domain.nn import attention, linear, norms

    proj = linear.projector(w, lora, ctx, layer, MODULE_KEYS, conv1d=True)

    def norm(h: "torch.Tensor", key: str) -> "torch.Tensor":
        return norms.layer_norm(h, w[key + ".weight"], w[key + ".bias"], p.eps)

    batch, seq, hidden = x.shape
    q, k, v = (t.view(batch, seq, -1, p.head_dim) for t in proj(norm(x, "ln_1"), "attn.c_attn").split(hidden, dim=2))
    scale = p.head_dim ** -0.5 if p.scale_attn_weights else 1.0
    if p.scale_attn_by_inverse_layer_idx:
        scale /= float(layer + 1)
    a = attention.self_attention(q, k, v, ctx, FULL, scale=scale, kv_hook=kv_hook)
    x = x + proj(a, "attn.c_proj")
    return x + proj(norms.activation(p.activation)(proj(norm(x, "ln_2"), "mlp.c_fc")), "mlp.c_proj")


def final_norm(p: Params, weights: "Weights", x: "torch.Tensor") -> "torch.Tensor":
    """The final LayerNorm."""
    from lema.domain.nn import norms

    return norms.layer_norm(x, weights["ln_f.weight"], weights["ln_f.bias"], p.eps)


def plan_terms(model: ModelShape) -> PlanTerms:
    """The planner's GPT-2 formulas: LayerNorm, learned positions, one fused c_attn, a GELU MLP."""
    return PlanTerms(formulas=LayerFormulas.LEARNED_FUSED)


FAMILY = Family(name=NAME, model_types=("gpt2",), module_keys=MODULE_KEYS, dims=dims,
                expected_tensors=expected_tensors, params=params, embed=embed, block=block, final_norm=final_norm,
                targets=("c_attn", "c_proj", "c_fc"), default_targets=("c_attn",),
                peft_prefix="base_model.model.transformer.h.", conv1d=True, base_dropouts=base_dropouts,
                plan_terms=plan_terms, check_fields=check_gpt2_fields)
