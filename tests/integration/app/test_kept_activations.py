"""Kept activations (issue 27): the layers the plan keeps skip their recompute, the adapters are
bit-identical to the checkpointed run's on one thread (the same ops on the same values), and
the planned device total matches the CpuDevice's measured peak within 10%."""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from lema.adapters.devices.cpu import CpuDevice
from lema.app import bootstrap
from lema.app.runtime.training_pass import TrainingPass
from tests.model_files import save_monolithic
from tests.tolerance import on_one_thread

LAYERS = 4
SHAPE = dict(batch_size=2, max_seq_len=64, lora_rank=4, prefetch_distance=1)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=256))


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    return save_monolithic(_llama(), tmp_path_factory.mktemp("kept") / "m.safetensors")


def _config(path, **overrides) -> LemaConfig:
    return LemaConfig(**{**dict(gbi_path=str(path), device="cpu", seed=3, **SHAPE), **overrides})


def _partial_budget(path) -> int:
    """A device budget at which AUTO keeps the activations of some layers but not all."""
    spec = LemaModel(_config(path)).spec
    for quarter_mib in range(4, 256):
        budget = quarter_mib * 2**18
        config = _config(path, strategy="auto", vram_budget=budget)
        p = bootstrap.make_plan(config, spec, CpuDevice(capacity=budget))
        if p.fits and 0 < p.kept_layers < LAYERS:
            return budget
    raise AssertionError("no budget keeps part of the layers")


def _train(config: LemaConfig, steps: int = 3) -> tuple[list[torch.Tensor], LemaModel, int]:
    model = LemaModel(config, device=CpuDevice(capacity=config.vram_bytes, count_compute=True,
                                               direct_reads=True, in_place=config.vram_bytes is None))
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
    peak = 0
    for i in range(steps):
        ids = torch.randint(0, 256, (SHAPE["batch_size"], SHAPE["max_seq_len"]),
                            generator=torch.Generator().manual_seed(i))
        model.device.reset_peak()
        trainer.train_step(ids)
        peak = max(peak, model.device.peak_bytes())
    return [p.detach().clone() for p in model.get_trainable_parameters()], model, peak


def test_auto_keeps_every_layer_with_memory_to_spare_and_matches_the_checkpointed_run_bit_for_bit(llama_file):
    reference, ckpt, _ = on_one_thread(lambda: _train(_config(llama_file, strategy="auto",
                                                              gradient_checkpointing=True)))
    assert ckpt.plan().kept_layers == 0
    params, model, _ = on_one_thread(lambda: _train(_config(llama_file, strategy="auto")))
    assert model.plan().kept_layers == LAYERS
    assert model.plan().kept_units == frozenset(range(1, LAYERS + 1))
    assert any("keeps activations of layers 1-4" in c for c in model.plan().choices)
    for a, b in zip(reference, params):
        assert torch.equal(a, b)


def test_part_of_the_layers_kept_under_a_budget_matches_the_checkpointed_run_bit_for_bit(llama_file):
    budget = _partial_budget(llama_file)
    reference, _, _ = on_one_thread(lambda: _train(_config(llama_file, strategy="auto", vram_budget=budget,
                                                           gradient_checkpointing=True)))
    params, model, _ = on_one_thread(lambda: _train(_config(llama_file, strategy="auto", vram_budget=budget)))
    k = model.plan().kept_layers
    assert 0 < k < LAYERS
    assert model.plan().kept_units == frozenset(range(LAYERS - k + 1, LAYERS + 1))
    for a, b in zip(reference, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["all", "part"])
def test_planned_device_peak_with_kept_activations_within_10_percent(llama_file, kind):
    budget = 512 * 2**20 if kind == "all" else _partial_budget(llama_file)
    _, model, peak = _train(_config(llama_file, strategy="auto", vram_budget=budget))
    planned = model.plan().device_total
    assert (model.plan().kept_layers == LAYERS) if kind == "all" else (0 < model.plan().kept_layers < LAYERS)
    print(f"kept {model.plan().kept_layers} peak {peak} plan {planned} ratio {peak / planned:.3f}")
    assert abs(peak - planned) / planned <= 0.10, (peak, planned, peak / planned)


def test_a_training_pass_refuses_to_tile_kept_layers(llama_file):
    from lema.errors import ConfigError

    with pytest.raises(ConfigError, match="kept activations"):
        TrainingPass(None, None, None, torch.zeros(1, 8, 4), None, tile_tokens=4,  # type: ignore[arg-type]
                     kept_units=frozenset({1}))


def test_the_training_loop_predicts_the_step_from_the_plan(llama_file):
    from lema.app.training.step_time import predicted_step_seconds, time_text

    _, model, _ = _train(_config(llama_file, strategy="auto"), steps=1)
    predicted = predicted_step_seconds(model)
    assert predicted is not None and predicted > 0
    assert predicted_step_seconds(model, 4) == 4 * predicted
    assert time_text({"seconds": 1.5, "predicted_seconds": 1.25}) == "step 1.5 s (predicted 1.25 s)"
    assert time_text({"seconds": 1.5}) == ""  # not warmed up yet
