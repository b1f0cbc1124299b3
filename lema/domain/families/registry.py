"""The registry of model families: which family a config belongs to, and what it provides (pure).

A family is one module of :mod:`lema.domain.families` that says everything that differs
between families, torchtune-style, and nothing else:

* ``NAME``, ``MODEL_TYPES``: its name and the ``model_type`` values it reads;
* ``MODULE_KEYS`` (every adaptable linear module of a layer, in execution order),
  ``TARGETS`` (their names as peft sees them), ``DEFAULT_TARGETS``, ``PEFT_PREFIX`` (peft's
  key prefix of decoder layer ``i``), ``CONV1D`` (weights stored ``[in, out]``);
* ``dims(config)``: the dimensions, after refusing by name and value every config option
  the family does not implement;
* ``expected_tensors(dims, config, names)``: every tensor a file must hold, by unit;
* ``params(config_json)``: what its blocks read (with ``layout``, the
  :class:`~lema.domain.model.layout.AttentionLayout`, and ``final_softcap``);
* ``base_dropouts(config)``: the base model's non-zero dropouts, which LEMA does not apply;
* ``embed``, ``block``, ``final_norm``: its math, on the shared pieces of
  :mod:`lema.domain.model` (imported when first called, so reading a config never imports
  torch);
* optionally ``plan_terms(spec)``: what its layers keep for backward beyond a Llama
  layer's (:class:`~lema.domain.model.layout.PlanTerms`), for the memory plan.

Adding a family is one new module listed in ``FAMILIES`` plus its tests. Families never
import each other.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

from lema.domain.families import gemma2, gemma3, gpt2, llama, mixtral, olmo2, phi3, qwen3, qwen3_moe
from lema.domain.model.layout import (
    DECODER,
    EMBED,
    HEAD,
    Dims,
    ExpectedTensor,
    PlanTerms,
    is_ignored,
)
from lema.domain.model.config_values import check_fields
from lema.errors import ModelFormatError

if TYPE_CHECKING:
    from lema.domain.model.spec import ModelSpec

FAMILIES: dict[str, ModuleType] = {m.NAME: m for m in (llama, qwen3, gemma2, gemma3, phi3, olmo2, mixtral,
                                                       qwen3_moe, gpt2)}

__all__ = ["DECODER", "EMBED", "FAMILIES", "HEAD", "Dims", "ExpectedTensor", "base_dropouts", "default_targets",
           "dims_of", "expected_tensors", "family", "family_of", "is_ignored", "params_of", "plan_terms",
           "supported_model_types", "target_modules"]


def supported_model_types() -> tuple[str, ...]:
    """Every ``model_type`` some family reads."""
    return tuple(t for m in FAMILIES.values() for t in m.MODEL_TYPES)


def family_of(config: Mapping[str, Any]) -> str:
    """The family name of a config dict, or ModelFormatError naming the unknown model_type."""
    if not isinstance(config, Mapping):
        raise ModelFormatError(f"config.json: expected a JSON object, found {type(config).__name__}")
    raw = config.get("model_type")
    model_type = raw.lower() if isinstance(raw, str) else ""
    for name, module in FAMILIES.items():
        if model_type in module.MODEL_TYPES:
            return name
    archs = config.get("architectures")
    names = [a for a in archs if isinstance(a, str)][:3] if isinstance(archs, list) else []
    shown = "(missing)" if raw is None else repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:37] + "..."
    raise ModelFormatError(
        f"unknown architecture: model_type {shown} "
        f"{'(' + ', '.join(names) + ') ' if names else ''}is not supported; LEMA "
        f"trains {', '.join(supported_model_types())} models"
    )


def family(name: str) -> ModuleType:
    """The module of a family name (``spec.family``)."""
    return FAMILIES[name]


def dims_of(config: Mapping[str, Any]) -> Dims:
    """Read a model's dimensions from its config dict.

    Raises:
        ModelFormatError: an unknown ``model_type``, or one line naming every config option
            (and value) the family does not implement.
    """
    family = family_of(config)
    # Malformed values (wrong types, out of bounds) first, in one line; then what the family
    # does not implement, refused by the family by name.
    check_fields(config, family)
    return FAMILIES[family].dims(config)


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's non-zero dropout probabilities (config key -> p), which LEMA's
    training does not apply: it trains as transformers does with them set to 0."""
    return FAMILIES[family_of(config)].base_dropouts(config)


def default_targets(name: str) -> tuple[str, ...]:
    """The LoRA target modules LEMA uses when none are given."""
    return FAMILIES[name].DEFAULT_TARGETS


def target_modules(name: str) -> tuple[str, ...]:
    """Every module name LoRA can target in this family."""
    return FAMILIES[name].TARGETS


def expected_tensors(config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a model of this config has, grouped into units.

    Args:
        config: the ``config.json`` dict.
        names: the file's tensor names, where a family reads more than one layout (GPT-2's
            ``transformer.`` prefix or none).
    """
    dims = dims_of(config)
    return FAMILIES[dims.family].expected_tensors(dims, config, names)


def params_of(spec: "ModelSpec") -> Any:
    """The family parameters a spec's blocks read (cached per config)."""
    return FAMILIES[spec.family].params(spec.config_json)


def plan_terms(spec: "ModelSpec") -> PlanTerms:
    """What a layer of this family keeps for backward beyond a Llama layer's (for the planner)."""
    terms = getattr(FAMILIES[spec.family], "plan_terms", None)
    return terms(spec) if terms is not None else PlanTerms()


def config_text(config: Mapping[str, Any]) -> str:
    """The canonical JSON text of a config (``ModelSpec.config_json``)."""
    return json.dumps(dict(config), sort_keys=True)
