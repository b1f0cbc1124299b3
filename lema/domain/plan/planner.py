"""The memory planner: how many bytes a LoRA run needs on the device, the host and the link.

Pure arithmetic over a :class:`~lema.domain.model.spec.ModelSpec` and a :class:`TrainingShape`
(DESIGN.md section 4). The plan itemises the device and host bytes, gives a verdict
against a :class:`Budget` with the headroom, counts the bytes moved host -> device per
step, and says what would make it fit (:mod:`lema.domain.plan.recommend`). Sizes are integer
bytes; formatting happens at the edge.

The device model (what the engine allocates, in this order of size for big models):
units ``1..L+1`` (decoder layers and the head) are streamed through ``min(prefetch + 1,
n_streamed)`` slots of the largest streamed unit, unless kept resident (AUTO keeps as many
decoder layers as fit, from layer 0 upward, then the head). The embedding is gathered on
the host and only its output is uploaded. LoRA parameters, gradients and AdamW states are
fp32. With gradient checkpointing each layer's input is kept (on the device, or with
activation offload in host memory between its forward and its backward). The step's transient phases
(the forward, the head's chunked loss + backward, one layer's recompute + backward, the
optimizer step) run one after another, so the device total is the persistent items plus
``activation_peak``, the largest phase (:func:`activation_phases`), not their sum.

Offload and sequence tiling (``TrainingShape.offload_activations``, ``tile_tokens``) are
decided here when the shape leaves them open (None): the cheapest option that fits, in
the order whole layers on the device, whole layers with offload, then tiles from the
largest down, each without and with offload (:func:`resolve_activations`).

Example:
    >>> from lema.domain.model.spec import ModelSpec
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
    >>> p = plan(ModelSpec.from_config(cfg, dtype="F32"), TrainingShape(seq=32), Budget(2**30))
    >>> p.fits, p.slot_count
    (True, 3)
"""

from __future__ import annotations

import attrs

from lema.domain.model.spec import ModelSpec
from lema.domain.plan import items as pi
from lema.domain.plan.assemble import _summary, auto_resident, facts_for, resolve_activations
from lema.domain.plan.choose import choose
from lema.domain.plan.inputs import DEFAULT_PREFETCH, PREFETCH_DEPTHS, Budget, TrainingShape
from lema.domain.plan.items import MemoryItem, ModelFacts
from lema.domain.plan.memory_plan import MemoryPlan, ModelSummary
from lema.domain.plan.other_options import with_other_options
from lema.domain.plan.recommend import recommendations
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.plan.timing import MachineRates, predict_facts

__all__ = ["Budget", "MemoryItem", "MemoryPlan", "ModelSummary", "TrainingShape", "max_resident_layers", "plan"]


def plan(spec: ModelSpec, shape: TrainingShape | None = None, budget: Budget | None = None,
         rates: MachineRates | None = None) -> MemoryPlan:
    """Plan a LoRA run of ``spec`` with ``shape`` against ``budget``.

    Args:
        spec: the model.
        shape: the run (default: :class:`TrainingShape` defaults).
        budget: the memory available; None = unlimited (the plan fits, no recommendations).
        rates: the machine's rates the choices by time use (``kept_layers=None``); None: the
            device kind's stated defaults (:func:`lema.domain.plan.timing.default_rates`).

    Returns:
        The itemised :class:`MemoryPlan` with a verdict and recommendations.

    Raises:
        ConfigError: when the LoRA targets match no module of the family.
    """
    shape = TrainingShape() if shape is None else shape
    f = facts_for(spec, shape)
    summary = _summary(spec, shape, f)
    if shape.prefetch_auto:
        result = _choose_prefetch(summary, f, shape, budget, rates)
        shape = attrs.evolve(shape, prefetch=result.shape.prefetch, prefetch_auto=False)
    else:
        result = _plan_with(summary, f, shape, budget, rates)
    if budget is None:
        return result
    def facts_at(code: str) -> ModelFacts:
        return pi.model_facts(spec, code, f.targets, f.lora_modules, f.lora_keys)

    recs, fixes = recommendations(summary, f, result, facts_at, requested=shape)
    result = attrs.evolve(result, recommendations=recs, fixes=fixes)
    return with_other_options(result, spec, shape, budget, _plain)


def _choose_prefetch(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None,
                     rates: MachineRates | None) -> MemoryPlan:
    """AUTO's prefetch depth: of :data:`PREFETCH_DEPTHS`, the one whose plan fits with the
    smallest predicted step (ties: the default depth, then the shallower: less memory), with
    one ``chose:`` line comparing the depths. A deeper prefetch pays where compute per unit
    varies (the head, the turn to the backward, whose last ``prefetch`` units stay in their
    slots) or a slow link stalls the compute; it costs a slot of the largest streamed unit,
    memory resident layers or kept activations could have had. Another strategy keeps the
    shape's depth (:data:`DEFAULT_PREFETCH` unless given). A run that fits at no depth gets
    the default's plan (its verdict and recommendations)."""
    fixed = attrs.evolve(shape, prefetch_auto=False)
    if shape.strategy is not MemoryStrategy.AUTO:
        return _plan_with(summary, f, fixed, budget, rates)
    timed: dict[int, tuple[float, MemoryPlan]] = {}
    for depth in PREFETCH_DEPTHS:
        p = _plan_with(summary, f, attrs.evolve(fixed, prefetch=depth), budget, rates)
        if p.fits:
            timed[depth] = (predict_facts(p, f, rates).step_seconds, p)
    if not timed:
        return _plan_with(summary, f, attrs.evolve(fixed, prefetch=DEFAULT_PREFETCH), budget, rates)
    best = min(timed, key=lambda d: (round(timed[d][0], 6), d != DEFAULT_PREFETCH, d))
    seconds, chosen = timed[best]
    others = ", ".join(f"{d}: {timed[d][0] - seconds:+.3g} s" if d in timed else f"{d}: does not fit"
                       for d in PREFETCH_DEPTHS if d != best)
    slots = "1 weight slot" if chosen.slot_count == 1 else f"{chosen.slot_count} weight slots"
    if not chosen.streamed_units:
        line = f"prefetch {best}: nothing is streamed, so the depth changes nothing"
    else:
        line = f"prefetch {best} ({slots}): {seconds:.3g} s per step; other depths {others}"
    return attrs.evolve(chosen, choices=chosen.choices + (line,))


def _plain(spec: ModelSpec, shape: TrainingShape, budget: Budget | None) -> MemoryPlan:
    """The plan alone: no recommendations, no other options."""
    f = facts_for(spec, shape)
    return _plan_with(_summary(spec, shape, f), f, shape, budget)


def _plan_with(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None,
               rates: MachineRates | None = None) -> MemoryPlan:
    return choose(summary, f, resolve_activations(summary, f, shape, budget), budget, rates)


def max_resident_layers(spec: ModelSpec, shape: TrainingShape | None = None, budget: Budget | None = None) -> int:
    """How many decoder layers AUTO keeps on the device at this budget (0..n_layers)."""
    shape = TrainingShape() if shape is None else shape
    f = facts_for(spec, shape)
    summary = _summary(spec, shape, f)
    shape = resolve_activations(summary, f, shape, budget)
    resident = auto_resident(summary, f, shape, budget)
    return sum(1 for i in resident if i <= spec.n_layers)
