"""Choose by time, within memory: among the configurations that fit, the one with the smallest
predicted step (issue 27, pure).

The planner calls :func:`choose` when the shape leaves the kept activations open
(``kept_layers=None``: ``gradient_checkpointing="auto"`` with AUTO). For every count ``k`` of
kept layers (the last ``k`` decoder layers keep their autograd graph instead of recomputing
in the backward), AUTO keeps as many units resident as still fit
(:func:`~lema.domain.plan.assemble.auto_resident`); each candidate that fits is timed with
:func:`~lema.domain.plan.timing.predict_facts` and the fastest wins (ties: fewer kept layers,
so less memory). Memory kept activations take is memory resident layers cannot, so the
search weighs one against the other by what each saves: a recompute on a compute-bound
step, a fetch on a link-bound one.

The result carries one line per choice (:attr:`MemoryPlan.choices`), e.g.
``keeps activations of layers 25-32: -0.31 s per step``.
"""

from __future__ import annotations

import attrs

from lema.domain.plan.assemble import auto_resident, build, largest_fitting
from lema.domain.plan.inputs import Budget, TrainingShape
from lema.domain.plan.items import ModelFacts
from lema.domain.plan.memory_plan import MemoryPlan, ModelSummary
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.plan.timing import MachineRates, predict_facts

__all__ = ["choose", "kept_candidates"]


def kept_candidates(n_layers: int) -> list[int]:
    """Kept-layer counts the search tries: every count up to 16 layers, else 0, every
    eighth of the model, and the counts around them (plans are cheap, predictions too)."""
    if n_layers <= 16:
        return list(range(n_layers + 1))
    marks = {0, n_layers}
    for i in range(1, 8):
        marks.add(n_layers * i // 8)
    return sorted(marks)


def _layers(first: int, last: int) -> str:
    """``layers 25-32`` or ``layer 32``."""
    return f"layer {last}" if first == last else f"layers {first}-{last}"


def _units(k: int) -> str:
    return f"{k} unit" if k == 1 else f"{k} units"


def _resident(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None) -> tuple[int, ...]:
    return auto_resident(summary, f, shape, budget) if shape.strategy is MemoryStrategy.AUTO else ()


def head_first_resident(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None
                        ) -> tuple[int, ...] | None:
    """The head resident, then the most decoder layers (layer 0 upward) that fit; None when the
    head alone does not. With the head out of the slots, every slot is sized for a decoder
    layer (a 128k-vocabulary head is several layers' worth: ``(prefetch + 1)`` copies of it
    held for nothing)."""
    n, head = f.n_layers, f.n_layers + 1

    def fits(k: int) -> bool:
        return build(summary, f, shape, budget, tuple(range(1, k + 1)) + (head,)).fits

    if budget is None:
        return tuple(range(1, n + 1)) + (head,)
    if not fits(0):
        return None
    alike = len(set(f.unit_buffer_bytes[1:n + 1])) <= 1
    stable = max(0, n - shape.prefetch - 1) if alike else 0
    best = largest_fitting(fits, stable, n)  # fits is monotonic while the slot count stays
    return tuple(range(1, best + 1)) + (head,)


def choose(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None,
           rates: MachineRates | None = None) -> MemoryPlan:
    """The fastest plan (by predicted step) over the kept-layer counts that fit; see the module docstring.

    ``shape`` has its activations resolved; when they are tiled, nothing is kept (with offload,
    the kept layers' inputs stay on the device and the others' are offloaded).
    """
    n = f.n_layers
    decide = shape.kept_layers is None
    if not decide or not shape.training or not shape.gradient_checkpointing or shape.tile:
        fixed = attrs.evolve(shape, kept_layers=shape.kept_layers or 0)
        return build(summary, f, fixed, budget, _resident(summary, f, fixed, budget))
    options: list[tuple[float, int, MemoryPlan]] = []
    fallback = None
    for k in kept_candidates(n):
        option = attrs.evolve(shape, kept_layers=k)
        p = build(summary, f, option, budget, _resident(summary, f, option, budget))
        if k == 0:
            fallback = p
        timed = [(predict_facts(p, f, rates).step_seconds, k, p)] if p.fits else []
        if shape.strategy is MemoryStrategy.AUTO:
            with_head = head_first_resident(summary, f, option, budget)
            if with_head is not None and with_head != p.resident_units:
                q = build(summary, f, option, budget, with_head)
                if q.fits:
                    timed.append((predict_facts(q, f, rates).step_seconds, k, q))
        if timed:
            options.append(min(timed, key=lambda o: o[0]))
    if not options:
        assert fallback is not None
        return fallback
    seconds, k, best = min(options, key=lambda o: (round(o[0], 6), o[1]))
    base = next(o for o in options if o[1] == 0) if options[0][1] == 0 else None
    choices = []
    if k and base is not None:
        saved = seconds - base[0]
        choices.append(f"keeps activations of {_layers(n - k + 1, n)}: {saved:+.3g} s per step "
                       f"(vs recomputing them in the backward)")
        if len(best.resident_units) != len(base[2].resident_units):
            choices.append(f"keeps {_units(len(best.resident_units))} resident instead of "
                           f"{len(base[2].resident_units)}: the memory goes to kept activations, which save more")
    elif k == 0 and len(options) > 1:
        nxt = min((o for o in options if o[1]), key=lambda o: o[0])
        choices.append(f"recomputes every layer in the backward: keeping activations of "
                       f"{_layers(n - nxt[1] + 1, n)} would cost {nxt[0] - seconds:+.3g} s per step "
                       f"(fewer resident layers)")
    if best.resident_units and (n + 1) in best.resident_units and n not in best.resident_units:
        prefix = build(summary, f, best.shape, budget, _resident(summary, f, best.shape, budget))
        if prefix.fits:
            gain = seconds - predict_facts(prefix, f, rates).step_seconds
            choices.append(f"keeps the head resident, so the {best.slot_count} slots are sized for a decoder layer "
                           f"({best.slot_bytes / 2**20:,.0f} MiB, not {prefix.slot_bytes / 2**20:,.0f}): "
                           f"{gain:+.3g} s per step")
    if best.resident_units:
        bare = build(summary, f, best.shape, budget, ())
        gain = seconds - predict_facts(bare, f, rates).step_seconds
        if gain < -5e-4:  # a resident unit that saves nothing measurable is not worth a line
            choices.append(f"keeps {len(best.resident_units)} of {n + 1} units resident: {gain:+.3g} s per step "
                           f"(vs streaming them)")
    return attrs.evolve(best, choices=tuple(choices))
