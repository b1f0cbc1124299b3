"""What would make a plan fit (pure).

Every recommended value is found by planning again (binary search over the pure plan),
so a recommended ``--batch`` or ``--seq`` really fits when planned with it. Offload and
tiles the user left to the planner are decided again for every candidate, as the planner
would decide them.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from lema.domain.plan import items as pi
from lema.domain.plan.assemble import activation_options, auto_resident, build
from lema.domain.plan.inputs import TrainingShape
from lema.domain.plan.memory_plan import MemoryPlan, ModelSummary
from lema.domain.plan.preference import rows_per_example
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.units import format_size

MAX_BATCH = 1 << 14


def _fits(summary: ModelSummary, f: pi.ModelFacts, shape: TrainingShape, p: MemoryPlan) -> bool:
    # With nothing resident: AUTO fits exactly when its all-streamed plan fits; offload and
    # tiles left open fit when one of the planner's options does.
    return any(build(summary, f, option, p.budget, ()).fits for option in activation_options(shape, f))


def _largest(ok: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest n in [lo, hi] with ok(n), assuming ok is monotone (true, then false)."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def recommendations(summary: ModelSummary, f: pi.ModelFacts, p: MemoryPlan,
                    facts_at: Callable[[str], pi.ModelFacts] | None = None,
                    requested: TrainingShape | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Recommendations (sentences) and fixes (CLI options that each make ``p`` fit).

    Args:
        summary, f: the model, as the plan saw it.
        p: a plan with a budget.
        facts_at: the model's facts at another dtype code (for the ``--dtype`` suggestion).
        requested: the shape as asked for (offload and tiles maybe left open; default ``p.shape``).
    """
    s, recs, fixes = (requested or p.shape), [], []

    def fits(**changes: Any) -> bool:
        return _fits(summary, f, attrs.evolve(s, **changes), p)

    def needing(*notes: str, **changes: Any) -> str:
        """`` (notes; with activation offload)`` when the changed run fits only with measures this
        plan has not taken; just the notes otherwise."""
        option = next((o for o in activation_options(attrs.evolve(s, **changes), f)
                       if build(summary, f, o, p.budget, ()).fits), None)
        taken = [] if option is None else [
            name for name, now, before in (("activation offload", option.offloads, p.shape.offloads),
                                           (f"{option.tile}-position tiles", option.tile, p.shape.tile))
            if now and not before]
        words = [*notes, *(["with " + " and ".join(taken)] if taken else [])]
        return f" ({'; '.join(words)})" if words else ""

    # --batch counts examples: a preference step's are pairs of rows (lema.domain.plan.preference)
    rows = rows_per_example(s.preference)
    unit = " pairs" if rows > 1 else ""
    batch = _largest(lambda b: fits(batch=b * rows), 1, MAX_BATCH)
    seq = _largest(lambda q: fits(seq=q), 1, max(summary.max_positions, s.seq))
    if p.fits:
        if batch is not None:
            recs.append(f"largest batch that fits at seq {s.seq}: --batch {batch}{unit}"
                        f"{needing(batch=batch * rows)}")
        if seq is not None:
            capped = ("the model's context length",) if seq == summary.max_positions else ()
            recs.append(f"largest sequence that fits at batch {s.batch // rows}{unit}: --seq {seq}"
                        f"{needing(*capped, seq=seq)}")
        _activations(summary, f, p, s, recs)
        _residency(summary, f, p, recs)
        return tuple(recs), ()
    if not p.device_fits or not p.host_fits:
        if batch is not None and batch * rows < s.batch:
            fixes.append(f"--batch {batch}")
            recs.append(f"largest batch that fits at seq {s.seq}: --batch {batch}{unit}"
                        f"{needing(batch=batch * rows)}")
        if seq is not None and seq < s.seq:
            fixes.append(f"--seq {seq}")
            recs.append(f"largest sequence that fits at batch {s.batch // rows}{unit}: --seq {seq}"
                        f"{needing(seq=seq)}")
        prefetch = _largest(lambda d: fits(prefetch=d), 0, s.prefetch - 1) if s.prefetch > 0 else None
        if prefetch is not None:
            fixes.append(f"--prefetch {prefetch}")
            slots = "1 weight slot" if prefetch == 0 else f"{prefetch + 1} weight slots"
            recs.append(f"--prefetch {prefetch} fits ({slots} instead of {p.slot_count})")
        if s.offload_activations is False and fits(offload_activations=None):
            fixes.append("--offload-activations")
            recs.append("--offload-activations fits: the checkpointed layer inputs wait in host memory between "
                        "each layer's forward and backward" + (" (with sequence tiling)" if not fits(
                            offload_activations=True, tile_tokens=0) else ""))
        if not p.host_fits and s.strategy is MemoryStrategy.RESIDENT and fits(strategy=MemoryStrategy.STREAMING):
            fixes.append("--strategy streaming")
            recs.append("--strategy streaming fits: weights stay in the mmap'd file instead of host RAM")
        if facts_at is not None and f.act_bytes > 2:
            half = facts_at("BF16")
            if _fits(summary, half, attrs.evolve(s, dtype="BF16"), p):
                fixes.append("--dtype bfloat16")
                recs.append("--dtype bfloat16 fits (weights cast to 16-bit on load, half the bytes)")
    if not fixes:
        floor = build(summary, f, attrs.evolve(p.shape, batch=rows, seq=1, prefetch=0), None, ())
        recs.append(f"nothing at this budget fits: even batch 1{unit.rstrip('s')}, seq 1, prefetch 0 needs "
                    f"{format_size(floor.device_total)} on the device (largest streamed unit "
                    f"{format_size(floor.slot_bytes)}); use a larger device or a smaller model")
    return tuple(recs), tuple(fixes)


def _activations(summary: ModelSummary, f: pi.ModelFacts, p: MemoryPlan, requested: TrainingShape,
                 recs: list[str]) -> None:
    """Say what the planner turned on for the run to fit, and what the run needs without it."""
    s = p.shape
    if s.offloads and requested.offload_activations is None:
        without = build(summary, f, attrs.evolve(s, offload_activations=False), p.budget, p.resident_units)
        recs.append(f"activation offload is on: {format_size(p.activation_bytes_per_step)} of layer inputs wait in "
                    f"host memory between each layer's forward and backward (without it the run needs "
                    f"{format_size(without.device_total)}; --no-offload-activations turns it off)")
    if s.tile and requested.tile_tokens is None:
        whole = build(summary, f, attrs.evolve(s, tile_tokens=0), p.budget, p.resident_units)
        recs.append(f"sequence tiling is on: each layer's projections and MLP run over {s.tile}-position tiles "
                    f"(whole layers would need {format_size(whole.device_total)})")


def _residency(summary: ModelSummary, f: pi.ModelFacts, p: MemoryPlan, recs: list[str]) -> None:
    n = summary.n_layers
    if p.shape.strategy is MemoryStrategy.AUTO:
        layers = sum(1 for i in p.resident_units if i <= n)
        head = " and the head" if n + 1 in p.resident_units else ""
        recs.append(f"AUTO keeps {layers} of {n} decoder layers{head} on the device")
        return
    if p.shape.strategy is MemoryStrategy.RESIDENT:
        return
    auto = build(summary, f, p.shape, p.budget, auto_resident(summary, f, p.shape, p.budget))
    layers = sum(1 for i in auto.resident_units if i <= n)
    if layers:
        head = " and the head" if n + 1 in auto.resident_units else ""
        recs.append(f"--strategy auto keeps {layers} of {n} decoder layers{head} on the device: "
                    f"{format_size(auto.transfer_bytes_per_step)} per step over the link instead of "
                    f"{format_size(p.transfer_bytes_per_step)}")
