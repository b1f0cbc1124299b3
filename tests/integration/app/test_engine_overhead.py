"""The engine's fixed costs for the step-time model (issue 27): measured on a toy of the
model's own family, per compute step and per pass, and carried by the calibration."""

from __future__ import annotations

from lema.adapters.devices.calibrate import calibrate, shrunk_spec
from lema.adapters.devices.cpu import CpuDevice
from lema.app.tools.engine_overhead import engine_overhead
from lema.domain.model.spec import ModelSpec
from lema.domain.plan.assemble import facts_for
from lema.domain.plan.inputs import TrainingShape

CONFIG = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_hidden_layers": 12, "intermediate_size": 512, "vocab_size": 1000}


def test_the_toy_keeps_the_family_and_its_options_at_toy_sizes():
    spec = ModelSpec.from_config(CONFIG, dtype="BF16")
    toy = shrunk_spec(spec, layers=5)
    assert toy is not None and toy.family == spec.family and toy.dtype == spec.dtype
    assert (toy.n_layers, toy.hidden_size, toy.vocab_size, toy.n_heads) == (5, 64, 256, 4)
    assert toy.n_kv_heads < toy.n_heads  # grouped-query attention stays grouped
    assert toy.weight_bytes < 2**20


def test_the_engine_overhead_is_measured_and_the_calibration_carries_it():
    spec = ModelSpec.from_config(CONFIG, dtype="F32")
    shape = TrainingShape(batch=1, seq=16, lora_rank=4, device_kind="cpu")
    per_step, per_pass = engine_overhead(spec, shape, CpuDevice())
    assert 0 <= per_step < 0.05 and 0 <= per_pass < 0.5
    seen = []

    def engine(s, sh, device):
        seen.append((s, sh))
        return 1e-3, 2e-3

    rates, path = calibrate(CpuDevice(), "cpu-test", facts_for(spec, shape), "F32", 1, 16, store=False, spec=spec,
                            shape=shape, engine=engine)
    assert path is None and seen == [(spec, shape)]
    assert rates.unit_overhead_s == 1e-3 and rates.step_overhead_s > 2e-3  # the step's own parts + the pass's
