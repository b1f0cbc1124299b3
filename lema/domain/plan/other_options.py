"""The options beyond the run's shape that would make a plan fit (pure).

:mod:`lema.domain.plan.recommend` searches the run's own shape (``--batch``, ``--seq``,
``--prefetch``, ``--offload-activations``, ``--dtype``); this module plans again with what
changes the device or the weights instead, so every "does not fit" names it too:

* ``--device cpu``: a device of the host's memory (no runtime reserve, no pinned staging);
  offered where the run planned for another kind of device;
* ``--reserve SIZE``: the smallest runtime reserve kept, found by planning again, when the
  plan counted one;
* ``--quantize nf4``: the linear weights stored in 4 bits (``lema convert --quantize nf4``),
  when the model is not quantized already.

Every option is offered only when the plan made with it fits the same budget.
"""

from __future__ import annotations

from typing import Callable

import attrs

from lema.domain.device_traits import DEVICE_KINDS
from lema.domain.model.spec import ModelSpec
from lema.domain.plan.inputs import Budget, TrainingShape
from lema.domain.plan.memory_plan import MemoryPlan
from lema.domain.units import format_size
from lema.errors import ConfigError

__all__ = ["with_other_options"]

Planner = Callable[[ModelSpec, TrainingShape, Budget], MemoryPlan]
_MIB = 1024**2


def with_other_options(p: MemoryPlan, spec: ModelSpec, shape: TrainingShape, budget: Budget,
                       planner: Planner) -> MemoryPlan:
    """``p`` with the fixes and recommendations of :func:`other_options` added (``p`` itself when it fits)."""
    if p.fits:
        return p
    tried: list[str] = []
    fixes, recs = other_options(spec, shape, budget, planner, tried)
    if not fixes:
        if not tried or p.fixes:
            return p
        said = tuple(r.replace("; use a larger device", f"; nor with {' or '.join(tried)}: use a larger device")
                     if r.startswith("nothing at this budget fits") else r for r in p.recommendations)
        return attrs.evolve(p, recommendations=said)
    # "nothing at this budget fits" no longer holds once another option does
    kept = tuple(r for r in p.recommendations if not r.startswith("nothing at this budget fits")) \
        if not p.fixes else p.recommendations
    return attrs.evolve(p, fixes=(*p.fixes, *fixes), recommendations=(*kept, *recs))


def other_options(spec: ModelSpec, shape: TrainingShape, budget: Budget, planner: Planner,
                  tried: list[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fixes, recommendations): each option beyond the shape with which the run fits ``budget``.

    ``planner(spec, shape, budget)`` plans without these suggestions (the plain planner);
    ``tried`` gains every option planned, fitting or not.
    """
    fixes: list[str] = []
    recs: list[str] = []
    tried = [] if tried is None else tried

    def fits(s: TrainingShape, model: ModelSpec = spec) -> bool:
        return planner(model, s, budget).fits

    for kind, traits in DEVICE_KINDS.items():
        if kind == shape.device_kind or not traits.host_memory:
            continue
        tried.append(f"--device {kind}")
        if fits(attrs.evolve(shape, device_kind=kind)):
            fixes.append(f"--device {kind}")
            recs.append(f"--device {kind} fits: the run planned for {shape.device_kind}; on the {kind} (the host's "
                        f"memory) there is no runtime reserve and no staging copy")
    reserve = shape.reserve
    if reserve > 0:
        tried.append("--reserve 0")
        smallest = _largest_reserve(lambda r: fits(attrs.evolve(shape, reserve_bytes=r)), reserve)
        if smallest is not None:
            fixes.append(f"--reserve {_size_option(smallest)}")
            recs.append(f"--reserve {_size_option(smallest)} fits (the plan keeps {format_size(reserve)} for the "
                        f"runtime; a smaller reserve risks running out of memory if the runtime needs more)")
    if spec.quantization is None:
        from lema.domain.nn.quant import QuantFormat

        try:
            quantized: ModelSpec | None = spec.quantized(QuantFormat.parse("nf4", double_quant=True))
        except ConfigError:  # a model that cannot be stored quantized (Conv1D weights, fused experts)
            quantized = None
        if quantized is not None:
            tried.append("--quantize nf4")
        if quantized is not None and fits(shape, quantized):
            fixes.append("--quantize nf4")
            recs.append("--quantize nf4 fits: the linear weights in 4 bits (`lema convert --quantize nf4` writes "
                        "the model so; LoRA trains on top of them, QLoRA-style)")
    return tuple(fixes), tuple(recs)


def _largest_reserve(ok: Callable[[int], bool], reserve: int) -> int | None:
    """The largest reserve below ``reserve`` (a MiB multiple) with which the run fits, or None."""
    if not ok(0):
        return None
    lo, hi = 0, reserve // _MIB - 1  # in MiB; ok(lo) holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid * _MIB):
            lo = mid
        else:
            hi = mid - 1
    return lo * _MIB


def _size_option(n: int) -> str:
    return "0" if n == 0 else f"{n // _MIB}M"
