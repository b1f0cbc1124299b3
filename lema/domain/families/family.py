"""Family: the typed record a model family module fills in, and the registry reads.

Everything that differs between families, and nothing else (torchtune's per-model builders
are the model); the math the families share lives once in :mod:`lema.domain.nn`. A family
module builds its functions and ends with one ``FAMILY = Family(...)``; a type checker
verifies that its parameters, blocks and norms agree (``Family[P]``: ``params`` returns the
``P`` that ``embed``, ``block`` and ``final_norm`` read).

Example:
    >>> from lema.domain.families.llama import FAMILY
    >>> FAMILY.name, FAMILY.targets[:2], FAMILY.peft_prefix
    ('llama', ('q_proj', 'k_proj'), 'base_model.model.model.layers.')
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Generic, Mapping, Protocol, TypeVar

import attrs

from lema.domain.nn.config_values import check_fields as check_standard_fields
from lema.domain.nn.options import attention_dropout
from lema.domain.nn.layout import AttentionLayout, Dims, ExpectedTensor, ModelShape, PlanTerms

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.linear import Adapters, Weights

__all__ = ["Block", "BlockParams", "Config", "Embed", "Family", "FinalNorm", "no_extra_terms"]

# A config.json object as parsed (values are JSON values; each family reads them through
# lema.domain.nn.options and config_int, which check types and bounds).
Config = Mapping[str, object]


class BlockParams(Protocol):
    """What every family's parameters carry (read by the model-level code above the families)."""

    @property
    def layout(self) -> AttentionLayout: ...

    @property
    def final_softcap(self) -> float | None: ...


P = TypeVar("P", bound=BlockParams)
P_in = TypeVar("P_in", bound=BlockParams, contravariant=True)


class Embed(Protocol[P_in]):
    def __call__(self, p: P_in, weights: Weights, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor: ...


class Block(Protocol[P_in]):
    def __call__(self, p: P_in, w: Weights, lora: Adapters | None, x: torch.Tensor, ctx: BlockContext, layer: int,
                 kv_hook: KVHook | None = None) -> torch.Tensor: ...


class FinalNorm(Protocol[P_in]):
    def __call__(self, p: P_in, weights: Weights, x: torch.Tensor) -> torch.Tensor: ...


def no_extra_terms(model: ModelShape) -> PlanTerms:
    """A layer that keeps for backward what a Llama layer keeps."""
    return PlanTerms()


def _leaf_names(module_keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(k.split(".")[-1] for k in module_keys)


@attrs.frozen(kw_only=True)
class Family(Generic[P]):
    """One model family.

    Attributes:
        name: the family's name (``ModelSpec.family``).
        model_types: the ``model_type`` values of ``config.json`` it reads.
        module_keys: every adaptable linear map of a layer, in execution order.
        dims: the dimensions of a config, after refusing by name and value every option
            the family does not implement.
        expected_tensors: every tensor a file must hold, by unit (``(dims, config, names)``;
            ``names``: the file's names, where a family reads more than one layout).
        params: what its blocks read, from the parsed config (``registry.params_of`` caches it).
        embed, block, final_norm: its math, on :mod:`lema.domain.nn`.
        check_fields: checks the config fields the family reads, by type and bound, before
            ``dims`` (default: transformers' standard names).
        targets: the module names peft's ``target_modules`` accepts (default: the keys' last part).
        default_targets: what LoRA adapts when the user names none (default: all targets).
        peft_prefix: peft's key prefix of decoder layer ``i``.
        conv1d: weights stored ``[in, out]`` (GPT-2's Conv1D).
        base_dropouts: the base model's non-zero dropouts, which LEMA does not apply
            (default: ``attention_dropout``).
        plan_terms: what a layer keeps for backward beyond a Llama layer's (the planner's terms).
        experts: its layers route tokens to experts (LoRA on the experts and the router is
            not implemented, so ``all-linear`` is refused).
        longrope_cache_reset: generation drops the KV cache when it crosses LongRoPE's
            original length, as transformers does for this family (Phi-3).
    """

    name: str
    model_types: tuple[str, ...]
    module_keys: tuple[str, ...]
    dims: Callable[[Config], Dims]
    expected_tensors: Callable[[Dims, Config, "set[str] | None"], list[ExpectedTensor]]
    params: Callable[[Config], P]
    embed: Embed[P]
    block: Block[P]
    final_norm: FinalNorm[P]
    check_fields: Callable[[Config], None] = check_standard_fields
    targets: tuple[str, ...] = attrs.field(
        default=attrs.Factory(lambda self: _leaf_names(self.module_keys), takes_self=True))
    default_targets: tuple[str, ...] = attrs.field(
        default=attrs.Factory(lambda self: self.targets, takes_self=True))
    peft_prefix: str = "base_model.model.model.layers."
    conv1d: bool = False
    base_dropouts: Callable[[Config], dict[str, float]] = attention_dropout
    plan_terms: Callable[[ModelShape], PlanTerms] = no_extra_terms
    experts: bool = False
    longrope_cache_reset: bool = False
