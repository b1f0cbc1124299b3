"""Config options every family reads the same way, and the refusal of those LEMA does not implement (pure).

A family implements a config option (the math follows it, as transformers does) or
refuses it by name and value: a file never loads as a silently different model. The
helpers here collect a family's problems and raise them as one
:class:`~lema.errors.ModelFormatError` line. Torch-free, so ``lema plan`` checks a config
without importing torch.

Example:
    >>> problems = common_problems({"model_type": "llama", "hidden_act": "silu", "num_hidden_layers": 2,
    ...                             "is_causal": False}, "hidden_act", "silu")
    >>> problems
    ['is_causal=False is not implemented (LEMA trains causal language models)']
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from lema.domain.nn import quant
from lema.domain.nn.layout import FULL, SLIDING, config_int
from lema.errors import ModelFormatError

# The activations lema.domain.nn.norms implements (names as transformers' ACT2FN spells them).
ACTIVATIONS = ("gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


def problem(option: str, value: Any, why: str) -> str:
    """One refusal, naming the option and its value: ``"mlp_bias=True is not implemented..."``."""
    return f"{option}={value!r} {why}"


def common_problems(config: Mapping[str, Any], activation_key: str, default_activation: str) -> list[str]:
    """The options no family implements: quantized weights other than bitsandbytes' NF4, FP4
    and int8 (:func:`lema.domain.nn.quant.unsupported`), bidirectional or non-causal
    attention, and an activation outside :data:`ACTIVATIONS`."""
    out = []
    if config.get("quantization_config"):
        why = quant.unsupported(config["quantization_config"])
        if why is not None:
            out.append(problem("quantization_config", config["quantization_config"], why))
    if config.get("use_bidirectional_attention"):
        out.append(problem("use_bidirectional_attention", config["use_bidirectional_attention"],
                           "is not implemented (LEMA trains causal language models)"))
    if config.get("is_causal") is False:
        out.append(problem("is_causal", False, "is not implemented (LEMA trains causal language models)"))
    act = config.get(activation_key) or default_activation
    if act not in ACTIVATIONS:
        out.append(problem(activation_key, act, f"is not implemented; LEMA implements {', '.join(ACTIVATIONS)}"))
    return out


def expect(config: Mapping[str, Any], key: str, default: Any, ok: Callable[[Any], bool], why: str) -> list[str]:
    """``[problem]`` when ``config[key]`` (or ``default``) fails ``ok``, else ``[]``."""
    value = config.get(key, default)
    return [] if ok(value) else [problem(key, value, why)]


def layer_types(config: Mapping[str, Any], n_layers: int, default: Sequence[str],
                problems: list[str]) -> tuple[str, ...]:
    """The config's ``layer_types`` (or ``default``), checked: one entry per layer, each
    ``full_attention`` or ``sliding_attention``; problems are appended to ``problems``."""
    types = config.get("layer_types") or list(default)
    if len(types) != n_layers:
        problems.append(problem("layer_types", types, f"has {len(types)} entries for {n_layers} layers"))
    unknown = sorted({str(t) for t in types} - {FULL, SLIDING})
    if unknown:
        problems.append(problem("layer_types", unknown, f"is not implemented; LEMA implements {FULL}, {SLIDING}"))
    return tuple(str(t) for t in types)


def window(config: Mapping[str, Any], key: str = "sliding_window") -> int | None:
    """A positive sliding window from the config, or None."""
    value = config.get(key)
    return None if value is None else config_int(config, key)


def nonzero_dropouts(config: Mapping[str, Any], *keys: tuple[str, float]) -> dict[str, float]:
    """The base model's dropout probabilities (``(key, transformers' default)`` pairs) that are
    not zero: LEMA does not apply them (it trains as transformers does with them at 0)."""
    out = {}
    for key, default in keys:
        value = config.get(key, default)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            out[key] = float(value)
    return out


def attention_dropout(config: Mapping[str, Any]) -> dict[str, float]:
    """``attention_dropout`` when it is not zero (transformers' default 0.0): the one base
    dropout most families have, which LEMA does not apply."""
    return nonzero_dropouts(config, ("attention_dropout", 0.0))


def raise_problems(config: Mapping[str, Any], problems: list[str]) -> None:
    """Raise every problem as one ModelFormatError line (nothing when the list is empty)."""
    if problems:
        model_type = config.get("model_type", "?")
        raise ModelFormatError(f"config.json ({model_type}): " + "; ".join(problems)
                               + "; LEMA refuses options it does not implement rather than train a different model")
