"""Typed, bounded reads of ``config.json`` fields, every problem collected into one error (pure).

A family reads its dimensions through a :class:`ConfigFields`: each read checks the
field's type (``"64"``, ``64.0``, ``[64]``, ``true`` are not integers), its sign and a
sane upper bound, records what is wrong and goes on with a placeholder, and
:meth:`ConfigFields.done` raises one :class:`~lema.errors.ModelFormatError` naming every
bad field. The bounds are far above any published model and keep planning a config
bounded in time and memory (a plan walks every layer).

Example:
    >>> fields = ConfigFields({"hidden_size": "64", "num_hidden_layers": 10**8})
    >>> fields.integer("hidden_size"), fields.integer("num_hidden_layers", maximum=MAX_LAYERS)
    (1, 1)
    >>> fields.done()
    Traceback (most recent call last):
    ...
    lema.errors.ModelFormatError: config.json: hidden_size='64' must be a positive integer; num_hidden_layers=100000000 is more than LEMA plans (at most 4,096); is this the model's own config.json?
"""

from __future__ import annotations

from typing import Any, Mapping

from lema.domain.json_values import is_finite_number
from lema.errors import ModelFormatError

# Upper bounds: each is several times the largest published model's value.
MAX_LAYERS = 4096
MAX_HIDDEN = 131_072
MAX_INTERMEDIATE = 1_048_576
MAX_VOCAB = 16_777_216
MAX_HEADS = 16_384
MAX_HEAD_DIM = 16_384
MAX_POSITIONS = 16_777_216
# The activations lema.domain.model.blocks implements (a test keeps the two in step).
ACTIVATIONS = ("gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
# Rotary variants lema.domain.nn.rope computes (through transformers' own functions).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
ATTENTION_KINDS = ("full_attention", "sliding_attention")
_PLACEHOLDER = 1  # stands in for a bad value so the remaining fields are still checked


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ConfigFields:
    """Reads fields of one config dict, collecting every problem (see the module docstring)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        if not isinstance(config, Mapping):
            raise ModelFormatError(f"config.json: expected a JSON object, found {type(config).__name__}")
        self.config = config
        self.problems: list[str] = []

    def integer(self, *names: str, default: int | None = None, maximum: int | None = None) -> int:
        """The first of ``names`` that is set (not null): a positive integer up to ``maximum``."""
        for name in names:
            value = self.config.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                self.problems.append(f"{name}={_shown(value)} must be a positive integer")
                return _PLACEHOLDER
            if maximum is not None and value > maximum:
                self.problems.append(f"{name}={_shown(value)} is more than LEMA plans (at most {maximum:,})")
                return _PLACEHOLDER
            return value
        if default is not None:
            return default
        self.problems.append(f"missing {' or '.join(names)}")
        return _PLACEHOLDER

    def optional_int(self, name: str, maximum: int | None = None) -> int | None:
        """A positive integer, or None when the field is absent or null."""
        return None if self.config.get(name) is None else self.integer(name, maximum=maximum)

    def flag(self, name: str, default: bool) -> bool:
        """``true`` or ``false`` (null: the default); ``"false"`` is a string, not a boolean."""
        value = self.config.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problems.append(f"{name}={_shown(value)} must be true or false")
            return default
        return value

    def positive_float(self, name: str, default: float) -> float:
        """A finite number > 0 (null: the default)."""
        value = self.config.get(name)
        if value is None:
            return default
        if not is_finite_number(value) or value <= 0:
            self.problems.append(f"{name}={_shown(value)} must be a finite number > 0")
            return default
        return float(value)

    def text(self, name: str, default: str, choices: tuple[str, ...] | None = None) -> str:
        """A string (null: the default), one of ``choices`` when given."""
        value = self.config.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or (choices is not None and value not in choices):
            allowed = f" (one of {', '.join(choices)})" if choices else ""
            self.problems.append(f"{name}={_shown(value)} must be a string{allowed}")
            return default
        return value

    def check(self, ok: bool, problem: str) -> None:
        """Record ``problem`` unless ``ok``."""
        if not ok:
            self.problems.append(problem)

    def done(self) -> None:
        """Raise one ModelFormatError naming every problem found, if any."""
        if not self.problems:
            return
        shown = "; ".join(self.problems[:8]) + (f"; and {len(self.problems) - 8} more"
                                                 if len(self.problems) > 8 else "")
        hint = "is this the model's own config.json?"
        if any(p.startswith("missing ") for p in self.problems):
            hint = "is this a causal LM config?"
        raise ModelFormatError(f"config.json: {shown}; {hint}")


def check_rope(fields: ConfigFields) -> None:
    """``rope_theta`` and ``rope_scaling`` / ``rope_parameters``: the rotary settings' types.

    transformers' own functions (used when a model is opened) check the rest.
    """
    fields.positive_float("rope_theta", 10_000.0)
    for name in ("rope_scaling", "rope_parameters"):
        value = fields.config.get(name)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            fields.check(False, f"{name}={_shown(value)} must be an object like {{\"rope_type\": \"linear\", "
                                "\"factor\": 2.0}, or null")
            continue
        kind = value.get("rope_type", value.get("type", "default"))
        fields.check(isinstance(kind, str), f"{name}.rope_type={_shown(kind)} must be a string")
        for key in ("factor", "rope_theta"):
            if key in value:
                number = value[key]
                fields.check(is_finite_number(number) and number > 0,
                             f"{name}.{key}={_shown(number)} must be a finite number > 0")


def check_layer_types(fields: ConfigFields, n_layers: int) -> None:
    """``layer_types``: null, or one attention kind per layer."""
    value = fields.config.get("layer_types")
    if value is None:
        return
    ok = (isinstance(value, list) and len(value) == n_layers
          and all(isinstance(t, str) and t in ATTENTION_KINDS for t in value))
    fields.check(ok, f"layer_types={_shown(value)} must list one of {' or '.join(ATTENTION_KINDS)} "
                     f"per layer ({n_layers})")


def check_gpt2_fields(config: Mapping[str, Any]) -> None:
    """Check, by type and bound, the fields GPT-2 reads under its own names (``n_embd``,
    ``n_layer``, ...), before the family reads them.

    Raises:
        ModelFormatError: naming every field of the wrong type, out of bounds, or
            inconsistent with another.
    """
    f = ConfigFields(config)
    hidden = f.integer("n_embd", "hidden_size", maximum=MAX_HIDDEN)
    heads = f.integer("n_head", "num_attention_heads", maximum=MAX_HEADS)
    f.check(hidden % heads == 0, f"n_embd={hidden} is not a multiple of n_head={heads}")
    f.integer("n_layer", "num_hidden_layers", maximum=MAX_LAYERS)
    f.integer("n_inner", default=4 * hidden, maximum=MAX_INTERMEDIATE)
    f.integer("vocab_size", maximum=MAX_VOCAB)
    f.flag("tie_word_embeddings", True)
    f.integer("n_positions", "n_ctx", default=1024, maximum=MAX_POSITIONS)
    f.positive_float("layer_norm_epsilon", 1e-5)
    f.text("activation_function", "gelu_new", ACTIVATIONS)
    f.flag("scale_attn_weights", True)
    f.flag("scale_attn_by_inverse_layer_idx", False)
    f.done()


def check_fields(config: Mapping[str, Any]) -> None:
    """Check the fields every family that uses transformers' standard names reads, by type
    and bound, before the family reads them.

    What a family does not implement is refused by the family itself
    (:mod:`lema.domain.nn.options`); this is about malformed values.

    Raises:
        ModelFormatError: naming every field of the wrong type, out of bounds, or
            inconsistent with another (heads that do not divide the hidden size, ...).
    """
    f = ConfigFields(config)
    hidden = f.integer("hidden_size", maximum=MAX_HIDDEN)
    heads = f.integer("num_attention_heads", maximum=MAX_HEADS)
    kv_heads = f.integer("num_key_value_heads", default=heads, maximum=MAX_HEADS)
    head_dim = f.optional_int("head_dim", maximum=MAX_HEAD_DIM)
    if head_dim is None:
        f.check(hidden % heads == 0, f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                                     "(and no head_dim is given)")
    f.check(heads % kv_heads == 0, f"num_attention_heads={heads} is not a multiple of "
                                   f"num_key_value_heads={kv_heads}")
    n_layers = f.integer("num_hidden_layers", maximum=MAX_LAYERS)
    for name in ("intermediate_size", "moe_intermediate_size"):
        f.optional_int(name, maximum=MAX_INTERMEDIATE)
    f.integer("vocab_size", maximum=MAX_VOCAB)
    f.flag("tie_word_embeddings", False)
    f.flag("attention_bias", False)
    f.flag("mlp_bias", False)
    f.integer("max_position_embeddings", default=2048, maximum=MAX_POSITIONS)
    f.positive_float("rms_norm_eps", 1e-6)
    for name in ("hidden_act", "hidden_activation"):
        f.text(name, "silu", ACTIVATIONS)
    f.optional_int("sliding_window", maximum=MAX_POSITIONS)
    f.flag("use_sliding_window", False)
    check_layer_types(f, n_layers)
    check_rope(f)
    f.done()
