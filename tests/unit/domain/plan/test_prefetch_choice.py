"""AUTO's prefetch depth, chosen by predicted step time within memory (issue 27). Pure."""

from __future__ import annotations

import attrs
import pytest

from lema.adapters.weights.builtin_models import builtin_config
from lema.domain.device_traits import DEVICE_KINDS
from lema.domain.model.spec import ModelSpec
from lema.domain.nn.quant import QuantFormat
from lema.domain.plan.planner import Budget, TrainingShape, plan
from lema.domain.plan.timing import default_rates, predict


def _70b_nf4() -> ModelSpec:
    return ModelSpec.from_config(builtin_config("llama-3.1-70b")).quantized(QuantFormat.parse("nf4", double_quant=True))


AUTO = TrainingShape(strategy="auto", kept_layers=None, prefetch_auto=True)


SLOW = attrs.evolve(default_rates(DEVICE_KINDS["cuda"], "F16"), link_bytes_per_s=10e9, link_pageable_bytes_per_s=10e9)


def test_a_link_bound_step_reads_deeper_where_it_pays_and_fits():
    spec, budget = _70b_nf4(), Budget.from_strings("24G")
    chosen = plan(spec, AUTO, budget, SLOW)
    today = plan(spec, attrs.evolve(AUTO, prefetch_auto=False), budget, SLOW)  # the default depth, 2
    assert chosen.fits and today.shape.prefetch == 2
    assert chosen.shape.prefetch > 2 and not chosen.shape.prefetch_auto
    assert chosen.slot_count == chosen.shape.prefetch + 1
    assert predict(chosen, spec, SLOW).bound == "link"
    assert predict(chosen, spec, SLOW).step_seconds < predict(today, spec, SLOW).step_seconds
    line = next(c for c in chosen.choices if c.startswith(f"prefetch {chosen.shape.prefetch} ("))
    assert "other depths 0: +" in line and "2: +" in line


def test_each_depth_is_planned_and_timed_and_the_fastest_that_fits_wins():
    spec, budget = _70b_nf4(), Budget.from_strings("24G")
    chosen = plan(spec, AUTO, budget)
    times = {}
    for depth in range(5):
        p = plan(spec, attrs.evolve(AUTO, prefetch=depth, prefetch_auto=False), budget)
        if p.fits:
            times[depth] = predict(p, spec).step_seconds
    assert predict(chosen, spec).step_seconds == pytest.approx(min(times.values()), rel=1e-9)


def test_a_named_depth_or_another_strategy_keeps_the_depth():
    spec, budget = _70b_nf4(), Budget.from_strings("24G")
    named = plan(spec, attrs.evolve(AUTO, prefetch=1, prefetch_auto=False), budget)
    assert named.shape.prefetch == 1 and not any(c.startswith("prefetch ") for c in named.choices)
    streaming = plan(spec, TrainingShape(strategy="streaming", prefetch_auto=True), budget)
    assert streaming.shape.prefetch == 2 and not any(c.startswith("prefetch ") for c in streaming.choices)


def test_nothing_streamed_keeps_the_default_and_says_the_depth_changes_nothing():
    spec = ModelSpec.from_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                  "num_hidden_layers": 4, "intermediate_size": 128, "vocab_size": 100}, dtype="F32")
    p = plan(spec, TrainingShape(seq=64, device_kind="cpu", weights_in_place=True, strategy="auto",
                                 kept_layers=None, prefetch_auto=True))
    assert p.shape.prefetch == 2 and "prefetch 2: nothing is streamed, so the depth changes nothing" in p.choices


def test_a_run_that_fits_at_no_depth_gets_the_default_depths_verdict():
    spec = _70b_nf4()
    p = plan(spec, AUTO, Budget.from_strings("2G"))
    assert not p.fits and p.shape.prefetch == 2 and p.recommendations


def test_a_compute_bound_step_does_not_pay_for_slots_it_does_not_need():
    spec, budget = _70b_nf4(), Budget.from_strings("24G")
    fast = attrs.evolve(default_rates(DEVICE_KINDS["cuda"], "F16"), link_bytes_per_s=1e14,
                        link_pageable_bytes_per_s=1e14)
    p = plan(spec, AUTO, budget, fast)
    assert predict(p, spec, fast).bound == "compute"
    assert p.shape.prefetch < plan(spec, AUTO, budget, SLOW).shape.prefetch
