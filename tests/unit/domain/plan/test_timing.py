"""The step-time model and AUTO's choices by time (issue 27): pure, no device."""

from __future__ import annotations

import attrs
import pytest

from lema.adapters.weights.builtin_models import builtin_config
from lema.domain.device_traits import DEVICE_KINDS
from lema.domain.model.spec import ModelSpec
from lema.domain.nn.quant import QuantFormat
from lema.domain.plan.planner import Budget, TrainingShape, plan
from lema.domain.plan.timing import MachineRates, default_rates, predict
from lema.errors import ConfigError

TINY = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4,
        "intermediate_size": 128, "vocab_size": 100}


def _70b_nf4() -> ModelSpec:
    return ModelSpec.from_config(builtin_config("llama-3.1-70b")).quantized(QuantFormat.parse("nf4", double_quant=True))


def test_the_70b_nf4_plan_at_24g_sizes_slots_for_a_decoder_layer_uses_the_memory_and_predicts_a_faster_step():
    spec = _70b_nf4()
    budget = Budget.from_strings("24G")
    today = plan(spec, TrainingShape(strategy="auto"), budget)  # kept_layers=0, head-last prefix
    chosen = plan(spec, TrainingShape(strategy="auto", kept_layers=None), budget)
    assert today.fits and chosen.fits
    decoder = max(chosen.model.largest_layer_bytes, 1)
    slots = chosen.item("weight_slots").bytes
    head_needs = spec.units[-1].nbytes if (spec.n_layers + 1) in chosen.resident_units else 0
    assert slots <= (chosen.shape.prefetch + 1) * decoder * 1.01  # aligned buffers
    assert slots + head_needs < today.item("weight_slots").bytes
    # the freed memory is used: more resident decoder layers (or kept activations)
    n = spec.n_layers
    more = len([u for u in chosen.resident_units if u <= n]) > len([u for u in today.resident_units if u <= n])
    assert more or chosen.kept_layers > 0
    assert predict(chosen, spec).step_seconds < predict(today, spec).step_seconds
    assert any("head resident" in c for c in chosen.choices)


def test_with_memory_to_spare_auto_keeps_every_layer_and_saves_the_recompute():
    spec = ModelSpec.from_config(TINY, dtype="F32")
    shape = TrainingShape(seq=64, batch=2, device_kind="cpu", strategy="auto", kept_layers=None)
    p = plan(spec, shape, None)
    assert p.kept_layers == 4
    t = predict(p, spec)
    assert t.phases["recompute"] == 0
    base = predict(plan(spec, attrs.evolve(shape, kept_layers=0), None), spec)
    # a recompute is a forward inside its backward's engine step (no bookkeeping of its own)
    assert base.phases["recompute"] == pytest.approx(base.phases["forward"] - 4 * base.rates.unit_overhead_s)
    assert t.step_seconds < base.step_seconds
    assert p.choices and p.choices[0].startswith("keeps activations of layers 1-4: -")


def test_gradient_checkpointing_named_keeps_todays_plan():
    spec = ModelSpec.from_config(TINY, dtype="F32")
    p = plan(spec, TrainingShape(seq=64, strategy="auto", kept_layers=0), Budget(2**30))
    assert p.kept_layers == 0 and p.kept_units == frozenset() and p.choices == ()
    assert p.resident_units == tuple(range(1, 6))  # the resident prefix, then the head, as before


def test_a_slow_link_makes_a_streamed_step_link_bound_and_a_fast_one_compute_bound():
    spec = ModelSpec.from_config(builtin_config("llama-2-7b"))
    p = plan(spec, TrainingShape(seq=512, device_kind="cuda"), Budget.from_strings("24G"))
    fast = default_rates(DEVICE_KINDS["cuda"], "F16")
    slow = attrs.evolve(fast, link_bytes_per_s=1e9, link_pageable_bytes_per_s=1e9)
    t_slow, t_fast = predict(p, spec, slow), predict(p, spec, fast)
    assert t_slow.bound == "link" and t_slow.step_seconds >= p.transfer_bytes_per_step / 1e9
    assert t_slow.step_seconds > t_fast.step_seconds
    huge = attrs.evolve(fast, link_bytes_per_s=1e15, link_pageable_bytes_per_s=1e15)
    assert predict(p, spec, huge).bound == "compute"
    disk = attrs.evolve(fast, disk_read_bytes_per_s=0.5e9)
    assert predict(p, spec, disk).bound == "disk"


def test_the_time_scales_with_the_rates_and_says_where_it_comes_from():
    spec = ModelSpec.from_config(TINY, dtype="F32")
    p = plan(spec, TrainingShape(seq=64, device_kind="cpu", weights_in_place=True))
    base = default_rates(DEVICE_KINDS["cpu"], "F32")
    twice = attrs.evolve(base, matmul_flops_per_s=2 * base.matmul_flops_per_s,
                         attention_flops_per_s=2 * base.attention_flops_per_s,
                         memory_bytes_per_s=2 * base.memory_bytes_per_s)
    fixed = predict(p, spec, base).fixed_seconds  # the fixed costs do not scale with the rates
    assert predict(p, spec, twice).step_seconds - fixed == pytest.approx((predict(p, spec, base).step_seconds
                                                                          - fixed) / 2)
    assert "not calibrated" in predict(p, spec).rates.source
    d = predict(p, spec).to_dict()
    assert d["bound"] == "compute" and set(d["phases_seconds"]) == {"forward", "recompute", "backward", "head",
                                                                    "optimizer", "step"}
    assert d["fixed_seconds"] == pytest.approx(fixed)


def test_bad_rates_are_refused():
    with pytest.raises(ConfigError, match="matmul_flops_per_s"):
        MachineRates(link_bytes_per_s=1.0, link_pageable_bytes_per_s=1.0, matmul_flops_per_s=0.0,
                     attention_flops_per_s=1.0, memory_bytes_per_s=1.0)
    assert MachineRates.from_dict(default_rates(DEVICE_KINDS["cpu"], "F32").to_dict()).memory_bytes_per_s > 0


def test_prefetch_overlaps_the_link_with_compute_and_serial_fetches_add_them():
    spec = ModelSpec.from_config(builtin_config("llama-2-7b"))
    rates = attrs.evolve(default_rates(DEVICE_KINDS["cuda"], "F16"), link_bytes_per_s=24e9)
    serial = plan(spec, TrainingShape(seq=2048, prefetch=0), None)
    ahead = plan(spec, TrainingShape(seq=2048, prefetch=2), None)
    t0, t2 = predict(serial, spec, rates), predict(ahead, spec, rates)
    # prefetch 0: every fetch waits for the compute before it and the compute for its fetch
    assert t0.step_seconds == pytest.approx(t0.compute_seconds + t0.link_seconds, rel=1e-6)
    # prefetch 2: overlapped, never better than the busier of the two (here the forward is
    # link-bound and the backward compute-bound, so the step lies between)
    assert max(t2.compute_seconds, t2.link_seconds) <= t2.step_seconds < t0.step_seconds
    # a link ten times faster hides behind the compute but for the first fetch
    fast = attrs.evolve(rates, link_bytes_per_s=240e9)
    t_fast = predict(ahead, spec, fast)
    first = spec.units[1].nbytes / 240e9
    assert t_fast.step_seconds == pytest.approx(t_fast.compute_seconds + first, rel=0.02)
