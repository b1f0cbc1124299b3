"""The memory plan of a preference step matches the CpuDevice's measured peak within 10%.

A DPO step (pairs as 2x rows, the reference's no-grad hidden state moved beside the policy's,
its no-grad head, the per-row log-prob buffers, the frozen reference adapter on the device:
:mod:`lema.domain.plan.preference`) and, at the same size, the SFT step over the same rows,
under the same rule as tests/integration/app/test_plan_accuracy.py. Sizes: the planning
sizes of that file (the plan's fixed terms do not dominate): the layer backward's peak, a
vocabulary large next to the model (the head's phase is the peak), and no checkpointing.
"""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.adapters.devices.cpu import CpuDevice
from lema.app.training.preference_step import frozen_adapter, use_preference
from lema.domain.objectives.preference import PreferenceObjective
from lema.domain.plan.inputs import Budget
from lema.domain.plan.planner import plan
from tests.model_files import save_monolithic

TOLERANCE = 0.10

CASES = {  # id: (hidden, intermediate, layers, vocab, pairs, seq, extra config)
    "layer-backward": (128, 344, 4, 256, 2, 64, {}),
    "big-vocab-head": (64, 172, 2, 8192, 1, 256, {}),
    "no-checkpointing": (128, 344, 4, 256, 2, 64, {"gradient_checkpointing": False}),
    # a long row under a budget: the plan offloads the layer inputs and tiles the layers
    # (measured once on 2 busy cores: sft 1.005, dpo 1.006; ~8 min there, hence slow)
    "long-offload-tiles": (64, 172, 4, 256, 1, 2048, {"vram_budget": 13_000_000}),
}
SLOW = {"long-offload-tiles"}


def _weights(tmp_path, h, ff, layers, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                         max_position_embeddings=4096))
    return save_monolithic(model, tmp_path / "m.safetensors")


def _peak(path, method, rows, seq, vocab, extra):
    preference = None if method == "sft" else "reference_adapter"
    model = LemaModel(LemaConfig(gbi_path=str(path), device="cpu", batch_size=rows, max_seq_len=seq, lora_rank=8,
                                 prefetch_distance=1, preference=preference, **extra),
                      device=CpuDevice(count_compute=True))
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
    if method != "sft":
        use_preference(trainer, PreferenceObjective(method), frozen_adapter(model.require_lora()))
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (rows, seq))
    labels = ids.clone()
    labels[:, :seq // 2] = -100  # the prompt half; full-length rows, as the plan assumes
    peak = 0
    for _ in range(3):  # AdamW's states are created by the first step
        model.device.reset_peak()
        trainer.train_step(ids, labels=labels)
        peak = max(peak, model.device.peak_bytes())
    return model.plan(), peak


@pytest.mark.parametrize("case", [c if c not in SLOW else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_dpo_step_peak_matches_plan_as_sft_does(tmp_path, case):
    h, ff, layers, vocab, pairs, seq, extra = CASES[case]
    path = _weights(tmp_path, h, ff, layers, vocab)
    results = {m: _peak(path, m, 2 * pairs, seq, vocab, extra) for m in ("sft", "dpo")}
    if case in SLOW:
        assert all(p.offload_activations and p.tile_tokens for p, _ in results.values())
    for method, (planned, peak) in results.items():
        print(f"{case} {method}: peak {peak} plan {planned.device_total} ratio {peak / planned.device_total:.3f}")
        assert abs(peak - planned.device_total) / planned.device_total <= TOLERANCE, (method, peak, planned)
    dpo_plan = results["dpo"][0]
    items = {i.name: i.bytes for i in dpo_plan.device_items}
    assert items["reference_adapter"] == items["lora_params"]  # the frozen copy, on the device
    assert dpo_plan.device_total > results["sft"][0].device_total


def test_does_not_fit_hints_speak_in_pairs():
    from lema.domain.model.spec import ModelSpec
    from lema.domain.plan.inputs import TrainingShape

    cfg = {"model_type": "llama", "hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 4,
           "intermediate_size": 344, "vocab_size": 256}
    spec = ModelSpec.from_config(cfg, dtype="F32")
    rows = TrainingShape(batch=16, seq=512, lora_rank=8, prefetch=1, device_kind="cpu", offload_activations=False,
                         tile_tokens=0)
    pairs = TrainingShape(batch=16, seq=512, lora_rank=8, prefetch=1, device_kind="cpu", offload_activations=False,
                          tile_tokens=0, preference="reference")
    budget = Budget(plan(spec, TrainingShape(batch=6, seq=512, lora_rank=8, prefetch=1, device_kind="cpu",
                                            offload_activations=False, tile_tokens=0)).device_total)
    sft, dpo = plan(spec, rows, budget), plan(spec, pairs, budget)
    assert not sft.fits and not dpo.fits
    sft_batch = next(f for f in sft.fixes if f.startswith("--batch"))
    dpo_batch = next(f for f in dpo.fixes if f.startswith("--batch"))
    n_rows, n_pairs = int(sft_batch.split()[1]), int(dpo_batch.split()[1])
    assert n_rows == 6 and n_pairs < n_rows // 2 + 1  # pairs: two rows each, plus the reference's terms
    assert plan(spec, attrs_evolve(pairs, batch=2 * n_pairs), budget).fits
    assert not plan(spec, attrs_evolve(pairs, batch=2 * n_pairs + 2), budget).fits
    assert any(f"--batch {n_pairs} pairs" in r for r in dpo.recommendations)
    assert "at batch 8 pairs" in " ".join(dpo.recommendations)
    assert "batch 8 pairs (16 rows)" in dpo.explain() and f"would fit with --batch {n_pairs}" in dpo.explain()


def attrs_evolve(shape, **changes):
    import attrs

    return attrs.evolve(shape, **changes)
