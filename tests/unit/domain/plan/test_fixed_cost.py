"""The step's fixed cost in the time model (issue 27): per decoder-layer pass, per head
chunk, per trainable tensor at the optimizer step, per step. Pure, no device."""

from __future__ import annotations

import attrs
import pytest

from lema.domain.device_traits import DEVICE_KINDS
from lema.domain.model.spec import ModelSpec
from lema.domain.plan.assemble import facts_for
from lema.domain.plan.planner import TrainingShape, plan
from lema.domain.plan.timing import MachineRates, default_rates, predict, trainable_tensors
from lema.errors import ConfigError


def _spec(layers: int, hidden: int = 64) -> ModelSpec:
    return ModelSpec.from_config({"model_type": "llama", "hidden_size": hidden, "num_attention_heads": 4,
                                  "num_hidden_layers": layers, "intermediate_size": 2 * hidden,
                                  "vocab_size": 100}, dtype="F32")


FREE = attrs.evolve(default_rates(DEVICE_KINDS["cpu"], "F32"), layer_forward_overhead_s=0.0,
                    layer_backward_overhead_s=0.0, head_overhead_s=0.0, tensor_overhead_s=0.0, step_overhead_s=0.0,
                    unit_overhead_s=0.0)
COSTLY = attrs.evolve(FREE, layer_forward_overhead_s=1e-3, layer_backward_overhead_s=3e-3, head_overhead_s=5e-4,
                      tensor_overhead_s=2e-5, step_overhead_s=7e-3, unit_overhead_s=3e-4)


@pytest.mark.parametrize("kept", [0, 3])
def test_the_fixed_cost_adds_each_part_once_per_pass(kept):
    spec = _spec(layers=3)
    shape = TrainingShape(batch=2, seq=1024, head_chunk_tokens=512, device_kind="cpu", weights_in_place=True,
                          kept_layers=kept)
    p = plan(spec, shape)
    f = facts_for(spec, shape)
    extra = predict(p, spec, COSTLY).step_seconds - predict(p, spec, FREE).step_seconds
    # 3 forwards, 3 backwards, the recomputes of the layers not kept, 4 head chunks, A and B of
    # each of the 7 adapted modules of 3 layers, one step; the engine's 7 compute steps (3
    # forwards, the head, 3 backwards: a recompute runs inside its backward's step)
    assert trainable_tensors(f) == 2 * 7 * 3
    expected = 3 * 1e-3 + 3 * 3e-3 + (3 - kept) * 1e-3 + 4 * 5e-4 + 42 * 2e-5 + 7e-3 + 7 * 3e-4
    assert extra == pytest.approx(expected, rel=1e-9)
    assert predict(p, spec, COSTLY).fixed_seconds == pytest.approx(expected, rel=1e-9)


def test_the_fixed_cost_weighs_most_on_a_small_model():
    small, big = _spec(layers=2, hidden=64), _spec(layers=2, hidden=1024)
    shape = TrainingShape(batch=4, seq=256, device_kind="cpu", weights_in_place=True)

    def share(spec: ModelSpec) -> float:
        t = predict(plan(spec, shape), spec, COSTLY)
        return t.fixed_seconds / t.step_seconds

    assert share(small) > 0.3 > 0.05 > share(big)


def test_a_streamed_step_pays_the_fixed_cost_too():
    spec = _spec(layers=4)
    shape = TrainingShape(batch=1, seq=64, device_kind="cpu", prefetch=0)
    p = plan(spec, shape)
    rates = attrs.evolve(COSTLY, link_bytes_per_s=1e9, link_pageable_bytes_per_s=1e9)
    free = attrs.evolve(FREE, link_bytes_per_s=1e9, link_pageable_bytes_per_s=1e9)
    # prefetch 0: nothing overlaps, so every fixed second adds to the step
    assert predict(p, spec, rates).step_seconds - predict(p, spec, free).step_seconds == pytest.approx(
        predict(p, spec, rates).fixed_seconds, rel=1e-9)


def test_negative_overheads_are_refused_and_the_defaults_state_some():
    with pytest.raises(ConfigError, match="tensor_overhead_s=-1.0 must be a number >= 0"):
        attrs.evolve(FREE, tensor_overhead_s=-1.0)
    cpu = default_rates(DEVICE_KINDS["cpu"], "F32")
    assert cpu.layer_forward_overhead_s > 0 and cpu.step_overhead_s > 0 and cpu.tensor_overhead_s > 0
    old_cache = {k: v for k, v in cpu.to_dict().items() if not k.endswith("_overhead_s")}
    assert MachineRates.from_dict(old_cache).step_overhead_s == 0.0


def test_on_an_asynchronous_device_the_fixed_cost_hides_behind_the_work_it_launches():
    cuda = attrs.evolve(default_rates(DEVICE_KINDS["cuda"], "F16"), link_bytes_per_s=1e15,
                        link_pageable_bytes_per_s=1e15, tensor_overhead_s=0.0, step_overhead_s=0.0,
                        layer_forward_overhead_s=0.0, layer_backward_overhead_s=0.0, head_overhead_s=0.0,
                        unit_overhead_s=0.0)
    costly = attrs.evolve(cuda, layer_forward_overhead_s=1e-3, layer_backward_overhead_s=2e-3)
    big, tiny = _spec(layers=2, hidden=4096), _spec(layers=2)
    shape = TrainingShape(batch=4, seq=2048, device_kind="cuda")
    p = plan(big, shape)
    # the big layer's kernels take longer than its launches: nothing added
    assert predict(p, big, costly).step_seconds == pytest.approx(predict(p, big, cuda).step_seconds, rel=1e-9)
    assert predict(p, big, costly).fixed_seconds == pytest.approx(0.0, abs=1e-12)
    # the toy's kernels are microseconds: its passes take their launches' time
    q = plan(tiny, attrs.evolve(shape, batch=1, seq=16))
    t = predict(q, tiny, costly)
    assert t.phases["forward"] == pytest.approx(2 * 1e-3) and t.phases["backward"] == pytest.approx(2 * 2e-3)
    assert 0 < t.fixed_seconds < 2 * (1e-3 + 1e-3 + 2e-3)
