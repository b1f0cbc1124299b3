"""The registry of model families: which family a config belongs to, and what it provides (pure).

Each family is one module of :mod:`lema.domain.families` that ends with a typed
:class:`~lema.domain.families.family.Family` record (its names, dimensions, tensors, LoRA
targets, math and plan terms); this module lists them in ``FAMILIES`` and answers for a
config or a model. Adding a family is one new module listed here plus its tests. Families
never import each other.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Protocol

from lema.domain.families import gemma2, gemma3, gpt2, llama, mixtral, olmo2, phi3, qwen3, qwen3_moe
from lema.domain.families.family import BlockParams, Family
from lema.domain.nn.layout import DECODER, EMBED, HEAD, Dims, ExpectedTensor, ModelShape, PlanTerms, is_ignored
from lema.errors import ModelFormatError

# Each family's parameters are its own type (Family[P]); the registry holds them side by side.
FAMILIES: dict[str, Family[Any]] = {m.FAMILY.name: m.FAMILY for m in (llama, qwen3, gemma2, gemma3, phi3, olmo2,
                                                                       mixtral, qwen3_moe, gpt2)}


class FamilyModel(ModelShape, Protocol):
    """What the registry reads of a model (``ModelSpec`` has these)."""

    @property
    def family(self) -> str: ...

__all__ = ["DECODER", "EMBED", "FAMILIES", "HEAD", "Dims", "ExpectedTensor", "base_dropouts", "default_targets",
           "dims_of", "expected_tensors", "family", "family_of", "is_ignored", "params_of", "plan_terms",
           "supported_model_types", "target_modules"]


def supported_model_types() -> tuple[str, ...]:
    """Every ``model_type`` some family reads."""
    return tuple(t for m in FAMILIES.values() for t in m.model_types)


def family_of(config: Mapping[str, Any]) -> str:
    """The family name of a config dict, or ModelFormatError naming the unknown model_type."""
    if not isinstance(config, Mapping):
        raise ModelFormatError(f"config.json: expected a JSON object, found {type(config).__name__}")
    raw = config.get("model_type")
    model_type = raw.lower() if isinstance(raw, str) else ""
    for name, fam in FAMILIES.items():
        if model_type in fam.model_types:
            return name
    archs = config.get("architectures")
    names = [a for a in archs if isinstance(a, str)][:3] if isinstance(archs, list) else []
    shown = "(missing)" if raw is None else repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:37] + "..."
    raise ModelFormatError(
        f"unknown architecture: model_type {shown} "
        f"{'(' + ', '.join(names) + ') ' if names else ''}is not supported; LEMA "
        f"trains {', '.join(supported_model_types())} models"
    )


def family(name: str) -> Family[Any]:
    """The record of a family name (``spec.family``)."""
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
    FAMILIES[family].check_fields(config)
    return FAMILIES[family].dims(config)


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's non-zero dropout probabilities (config key -> p), which LEMA's
    training does not apply: it trains as transformers does with them set to 0."""
    return FAMILIES[family_of(config)].base_dropouts(config)


def default_targets(name: str) -> tuple[str, ...]:
    """The LoRA target modules LEMA uses when none are given."""
    return FAMILIES[name].default_targets


def target_modules(name: str) -> tuple[str, ...]:
    """Every module name LoRA can target in this family."""
    return FAMILIES[name].targets


def expected_tensors(config: Mapping[str, Any], names: set[str] | None = None) -> list[ExpectedTensor]:
    """Every tensor a model of this config has, grouped into units.

    Args:
        config: the ``config.json`` dict.
        names: the file's tensor names, where a family reads more than one layout (GPT-2's
            ``transformer.`` prefix or none).
    """
    dims = dims_of(config)
    return FAMILIES[dims.family].expected_tensors(dims, config, names)


def params_of(spec: FamilyModel) -> BlockParams:
    """The family parameters a spec's blocks read (cached per config)."""
    return _params(spec.family, spec.config_json)


@functools.lru_cache(maxsize=64)
def _params(name: str, config_json: str) -> BlockParams:
    params: BlockParams = FAMILIES[name].params(json.loads(config_json))
    return params


def plan_terms(spec: FamilyModel) -> PlanTerms:
    """What a layer of this family keeps for backward beyond a Llama layer's (for the planner)."""
    return FAMILIES[spec.family].plan_terms(spec)


def config_text(config: Mapping[str, Any]) -> str:
    """The canonical JSON text of a config (``ModelSpec.config_json``)."""
    return json.dumps(dict(config), sort_keys=True)
