"""What the Llama-shaped families share: their config's dimensions and their tensor names.

Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Gemma 2/3, OLMo 2 and Phi-3 store the
embedding as ``model.embed_tokens``, layer ``i`` under ``model.layers.i.``, the final norm
as ``model.norm`` and the head as ``lm_head`` (the embedding when tied), and read the same
config keys for their sizes. Each family lists its own layer's tensors (their order is the
order of the unit's slot) from the pieces here.

Example:
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
    >>> d = decoder_dims(cfg, "llama", head_dim=16, max_positions=2048)
    >>> [t.key for t in decoder_tensors(d, [attention_weights(d)] * d.n_layers)][:3]
    ['embed_tokens.weight', 'self_attn.q_proj.weight', 'self_attn.k_proj.weight']
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from lema.domain.nn import options as opt
from lema.domain.nn.layout import SLIDING, Dims, ExpectedTensor, config_int

LayerTensors = Sequence[tuple[str, tuple[int, ...]]]  # (key inside the layer, shape)

# The adaptable linear maps of a Llama-shaped layer, in execution order.
ATTENTION_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
GATED_MLP_KEYS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Gemma's norms around both sub-layers.
SANDWICH_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")


def decoder_dims(config: Mapping[str, Any], family: str, head_dim: int, *, max_positions: int,
                 tied: bool = False, activation_key: str = "hidden_act", activation: str = "silu",
                 attention_bias: bool | None = None, intermediate_size: int | None = None,
                 **experts: int) -> Dims:
    """The :class:`Dims` of a config with the Llama key names.

    Args:
        config: the config dict (its options already checked by the family).
        family, head_dim: the family's name and its head width.
        max_positions, tied, activation: the defaults of ``max_position_embeddings``,
            ``tie_word_embeddings`` and the activation (read from ``activation_key``).
        attention_bias: None reads ``attention_bias`` (default false); a bool is the family's.
        intermediate_size: None reads ``intermediate_size``.
        experts: ``n_experts``, ``experts_per_token``, ``expert_intermediate_size``.
    """
    heads = config_int(config, "num_attention_heads")
    return Dims(
        family=family, model_type=str(config["model_type"]).lower(), n_layers=config_int(config, "num_hidden_layers"),
        hidden_size=config_int(config, "hidden_size"), n_heads=heads,
        n_kv_heads=config_int(config, "num_key_value_heads", default=heads), head_dim=head_dim,
        intermediate_size=config_int(config, "intermediate_size") if intermediate_size is None else intermediate_size,
        vocab_size=config_int(config, "vocab_size"), tied_embeddings=bool(config.get("tie_word_embeddings", tied)),
        attention_bias=bool(config.get("attention_bias", False)) if attention_bias is None else attention_bias,
        max_positions=config_int(config, "max_position_embeddings", default=max_positions),
        activation=str(config.get(activation_key) or activation), **experts,
    )


def head_dim(config: Mapping[str, Any], default: int | None = None) -> int:
    """``head_dim``, else ``default``, else ``hidden_size / num_attention_heads``."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    if default is not None:
        return default
    return config_int(config, "hidden_size") // config_int(config, "num_attention_heads")


def sandwich_dims(config: Mapping[str, Any], family: str, *, max_positions: int,
                  layer_types: Callable[[Mapping[str, Any], list[str]], Sequence[str]],
                  check_ropes: Callable[[Mapping[str, Any], int], object]) -> Dims:
    """A Gemma config's :class:`Dims` (head_dim 256, tied head, ``hidden_activation``), after
    refusing what the family does not implement: ``layer_types`` reads the layers' attention
    kinds (noting its problems), ``check_ropes`` refuses the rope settings it cannot use."""
    problems = opt.common_problems(config, "hidden_activation", "gelu_pytorch_tanh")
    types = layer_types(config, problems)
    problems += opt.expect(config, "sliding_window", 4096, lambda v: v is not None or SLIDING not in types,
                           "is not implemented with sliding layers (transformers fails on it)")
    opt.raise_problems(config, problems)
    check_ropes(config, head_dim(config, 256))
    return decoder_dims(config, family, head_dim(config, 256), max_positions=max_positions, tied=True,
                        activation_key="hidden_activation", activation="gelu_pytorch_tanh")


def attention_weights(d: Dims) -> list[tuple[str, tuple[int, ...]]]:
    """``self_attn.{q,k,v,o}_proj.weight``."""
    h, q, kv = d.hidden_size, d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    return [("self_attn.q_proj.weight", (q, h)), ("self_attn.k_proj.weight", (kv, h)),
            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.o_proj.weight", (h, q))]


def attention_biases(d: Dims, o: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """``self_attn.{q,k,v}_proj.bias`` (and ``o_proj.bias`` with ``o``)."""
    q, kv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    biases: list[tuple[str, tuple[int, ...]]] = [("self_attn.q_proj.bias", (q,)), ("self_attn.k_proj.bias", (kv,)),
                                                 ("self_attn.v_proj.bias", (kv,))]
    return biases + ([("self_attn.o_proj.bias", (d.hidden_size,))] if o else [])


def qk_norms(q_width: int, k_width: int) -> list[tuple[str, tuple[int, ...]]]:
    """``self_attn.{q,k}_norm.weight`` (per head: ``head_dim`` each; OLMo 2: the full widths)."""
    return [("self_attn.q_norm.weight", (q_width,)), ("self_attn.k_norm.weight", (k_width,))]


def gated_mlp(d: Dims, prefix: str = "mlp.", width: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """``{prefix}{gate,up,down}_proj.weight`` of an MLP ``width`` wide (default: ``intermediate_size``)."""
    h, ff = d.hidden_size, d.intermediate_size if width is None else width
    return [(prefix + "gate_proj.weight", (ff, h)), (prefix + "up_proj.weight", (ff, h)),
            (prefix + "down_proj.weight", (h, ff))]


def norm_weights(d: Dims, *names: str) -> list[tuple[str, tuple[int, ...]]]:
    """``{name}.weight`` of hidden-wide norms."""
    return [(f"{n}.weight", (d.hidden_size,)) for n in names]


def decoder_tensors(d: Dims, layers: Iterable[LayerTensors]) -> list[ExpectedTensor]:
    """The embedding, each layer's tensors (``layers``: one list per layer, in order), the
    final norm and the head (the embedding's tensor when tied)."""
    h = d.hidden_size
    out = [ExpectedTensor(0, "embed_tokens.weight", ("model.embed_tokens.weight",), (d.vocab_size, h))]
    for i, layer in enumerate(layers):
        out += [ExpectedTensor(i + 1, key, (f"model.layers.{i}.{key}",), shape) for key, shape in layer]
    head = d.n_layers + 1
    out.append(ExpectedTensor(head, "norm.weight", ("model.norm.weight",), (h,)))
    tied = ("model.embed_tokens.weight",) if d.tied_embeddings else ()
    out.append(ExpectedTensor(head, "lm_head.weight", ("lm_head.weight", *tied), (d.vocab_size, h)))
    return out
