"""The registry of model families: which family a config belongs to, and its tables (pure).

A family is one module of :mod:`lema.domain.families` with ``NAME``, ``MODEL_TYPES``,
``TARGETS`` (every module LoRA can target), ``DEFAULT_TARGETS``, ``dims(config)``,
``expected_tensors(dims, prefix)`` and ``base_dropouts(config)``. Adding a family is one new module listed in
``FAMILIES`` plus its tests. Families never import each other; shared math and types live
in :mod:`lema.domain.model`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping

from lema.domain.families import gpt2, llama
from lema.domain.model.layout import (
    DECODER,
    EMBED,
    HEAD,
    Dims,
    ExpectedTensor,
    is_ignored,
)
from lema.errors import ModelFormatError

FAMILIES: dict[str, ModuleType] = {m.NAME: m for m in (llama, gpt2)}

__all__ = ["DECODER", "EMBED", "FAMILIES", "HEAD", "Dims", "ExpectedTensor", "base_dropouts", "default_targets",
           "dims_of", "expected_tensors", "family_of", "gpt2_prefix", "is_ignored", "supported_model_types",
           "target_modules"]


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


def dims_of(config: Mapping[str, Any]) -> Dims:
    """Read a model's dimensions from its config dict."""
    return FAMILIES[family_of(config)].dims(config)


def base_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    """The base model's non-zero dropout probabilities (config key -> p), which LEMA's
    training does not apply: it trains as transformers does with them set to 0."""
    return FAMILIES[family_of(config)].base_dropouts(config)


def default_targets(family: str) -> tuple[str, ...]:
    """The LoRA target modules LEMA uses when none are given."""
    return FAMILIES[family].DEFAULT_TARGETS


def target_modules(family: str) -> tuple[str, ...]:
    """Every module name LoRA can target in this family."""
    return FAMILIES[family].TARGETS


def expected_tensors(dims: Dims, prefix: str | None = None) -> list[ExpectedTensor]:
    """Every tensor a model with these dims has, grouped into units.

    Args:
        dims: from :func:`dims_of`.
        prefix: GPT-2 only: ``"transformer."`` (transformers' layout, the default) or ``""``.
    """
    return FAMILIES[dims.family].expected_tensors(dims, prefix)


def gpt2_prefix(names: set[str]) -> str:
    """``"transformer."`` or ``""``, whichever layout a set of GPT-2 tensor names uses."""
    return gpt2.layout_prefix(names)
