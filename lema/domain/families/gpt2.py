"""The GPT-2 family (LayerNorm, learned positions, Conv1D ``[in, out]`` weights, GELU, tied
head): names, shapes, LoRA targets (pure)."""

from __future__ import annotations

from typing import Any, Mapping

from lema.domain.model.config_values import (
    ACTIVATIONS,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    ConfigFields,
)
from lema.domain.model.layout import Dims, ExpectedTensor

NAME = "gpt2"
MODEL_TYPES = ("gpt2",)
TARGETS = ("c_attn", "c_proj", "c_fc")
DEFAULT_TARGETS = ("c_attn",)


def dims(config: Mapping[str, Any]) -> Dims:
    """Read (and check) the dimensions of a GPT-2 config dict.

    Raises:
        ModelFormatError: naming every field of the wrong type, out of bounds, or
            inconsistent with another.
    """
    f = ConfigFields(config)
    model_type = str(config["model_type"]).lower()
    hidden = f.int("n_embd", "hidden_size", maximum=MAX_HIDDEN)
    heads = f.int("n_head", "num_attention_heads", maximum=MAX_HEADS)
    f.check(hidden % heads == 0, f"n_embd={hidden} is not a multiple of n_head={heads}")
    result = Dims(
        family=NAME, model_type=model_type,
        n_layers=f.int("n_layer", "num_hidden_layers", maximum=MAX_LAYERS), hidden_size=hidden,
        n_heads=heads, n_kv_heads=heads, head_dim=max(hidden // heads, 1),
        intermediate_size=f.int("n_inner", default=4 * hidden, maximum=MAX_INTERMEDIATE),
        vocab_size=f.int("vocab_size", maximum=MAX_VOCAB), tied_embeddings=f.bool("tie_word_embeddings", True),
        attention_bias=True, max_positions=f.int("n_positions", "n_ctx", default=1024, maximum=MAX_POSITIONS),
    )
    # What the blocks read when the model runs: checked now, before any plan or step.
    f.positive_float("layer_norm_epsilon", 1e-5)
    f.str("activation_function", "gelu_new", ACTIVATIONS)
    f.bool("scale_attn_weights", True)
    f.bool("scale_attn_by_inverse_layer_idx", False)
    f.done()
    return result


# transformers' GPT2Config defaults: a config without these keys trains with 0.1 each.
BASE_DROPOUTS = (("embd_pdrop", 0.1), ("attn_pdrop", 0.1), ("resid_pdrop", 0.1))


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's own dropout probabilities that are not zero (LEMA does not apply them)."""
    out = {}
    for key, default in BASE_DROPOUTS:
        value = config.get(key, default)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            out[key] = float(value)
    return out


def expected_tensors(d: Dims, prefix: str | None = None) -> list[ExpectedTensor]:
    """Every tensor a GPT-2 model has; ``prefix`` is ``"transformer."`` (transformers' layout,
    the default) or ``""`` (the original OpenAI checkpoints)."""
    p = "transformer." if prefix is None else prefix
    h, ff = d.hidden_size, d.intermediate_size
    out = [
        ExpectedTensor(0, "wte.weight", (p + "wte.weight",), (d.vocab_size, h)),
        ExpectedTensor(0, "wpe.weight", (p + "wpe.weight",), (d.max_positions, h)),
    ]
    for i in range(d.n_layers):
        lp = f"{p}h.{i}."
        layer = [
            ("ln_1.weight", (h,)), ("ln_1.bias", (h,)),
            ("attn.c_attn.weight", (h, 3 * h)), ("attn.c_attn.bias", (3 * h,)),
            ("attn.c_proj.weight", (h, h)), ("attn.c_proj.bias", (h,)),
            ("ln_2.weight", (h,)), ("ln_2.bias", (h,)),
            ("mlp.c_fc.weight", (h, ff)), ("mlp.c_fc.bias", (ff,)),
            ("mlp.c_proj.weight", (ff, h)), ("mlp.c_proj.bias", (h,)),
        ]
        out += [ExpectedTensor(i + 1, key, (lp + key,), shape) for key, shape in layer]
    head = d.n_layers + 1
    out += [
        ExpectedTensor(head, "ln_f.weight", (p + "ln_f.weight",), (h,)),
        ExpectedTensor(head, "ln_f.bias", (p + "ln_f.bias",), (h,)),
        ExpectedTensor(head, "lm_head.weight", ("lm_head.weight", p + "wte.weight"), (d.vocab_size, h)),
    ]
    return out


def layout_prefix(names: set[str]) -> str:
    """``"transformer."`` or ``""``, whichever layout a set of GPT-2 tensor names uses."""
    return "" if "wte.weight" in names and "transformer.wte.weight" not in names else "transformer."
