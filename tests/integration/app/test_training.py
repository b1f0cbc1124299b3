"""The guide's training API through the streaming engine: equivalences and memory."""

from __future__ import annotations

import copy

import attrs
import pytest
import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from lema.adapters.devices.cpu import CpuDevice
from lema.errors import DoesNotFitError
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model
from tests.tolerance import assert_close, forward_floor, on_one_thread, relative_error

STEPS = 3


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    return save_monolithic(build_hf_model("llama", seed=1), path)


def build_hf_model_layers(n_layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _batch(seed: int, batch: int = 2, seq: int = 12, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _train(path, steps: int = STEPS, device: CpuDevice | None = None, **overrides) -> tuple[list[torch.Tensor], LemaModel]:
    cfg = dict(gbi_path=str(path), device="cpu", lora_rank=4, lora_dropout=0.0, seed=3,
               batch_size=2, max_seq_len=12)
    cfg.update(overrides)
    model = LemaModel(LemaConfig(**cfg), device=device)
    model.initialize_lora()
    optimizer = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2)
    trainer = model.get_trainer(optimizer)
    for i in range(steps):
        trainer.train_step(_batch(i))
    return [p.detach().clone() for p in model.get_trainable_parameters()], model


def test_streaming_resident_and_every_prefetch_depth_give_bit_identical_adapters(llama_file):
    reference, model = _train(llama_file, strategy=MemoryStrategy.RESIDENT, prefetch_distance=2)
    n_units = model.spec.n_layers + 1
    for strategy in (MemoryStrategy.STREAMING, MemoryStrategy.AUTO):
        for prefetch in range(0, n_units + 1):
            params, _ = _train(llama_file, strategy=strategy, prefetch_distance=prefetch)
            for a, b in zip(reference, params):
                assert torch.equal(a, b), (strategy, prefetch)


def test_without_gradient_checkpointing_gives_the_same_adapters(llama_file):
    reference, model = _train(llama_file)
    params, _ = _train(llama_file, gradient_checkpointing=False)
    again, _ = on_one_thread(lambda: _train(llama_file))  # the checkpointed run against itself
    floor = forward_floor(model.spec, 12, extra=3)  # three AdamW steps
    for a, b, c in zip(reference, params, again):
        assert_close(b, a, noise=relative_error(c, a), floor=floor)


def test_each_layer_trains_its_own_adapter(llama_file):
    cfg = LemaConfig(gbi_path=str(llama_file), device="cpu", lora_rank=4, seed=0)
    model = LemaModel(cfg)
    model.initialize_lora()
    init = copy.deepcopy([{k: tuple(t.detach().clone() for t in pair) for k, pair in layer.items()}
                          for layer in model.lora.layers])
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
    for i in range(STEPS):
        trainer.train_step(_batch(i))
    layers = model.lora.layers
    for i, layer in enumerate(layers):
        for key, (a, b) in layer.items():
            assert not torch.equal(a, init[i][key][0]) and not torch.equal(b, init[i][key][1])
            for j, other in enumerate(layers):
                if j != i:
                    assert not torch.equal(a, other[key][0]) and not torch.equal(b, other[key][1])


def test_auto_with_room_for_everything_uploads_no_weights_after_the_first_step(llama_file):
    _, model = _train(llama_file, steps=1, strategy=MemoryStrategy.AUTO, vram_budget="1G")
    assert set(model.plan().resident_units) == {u.index for u in model.spec.units[1:]}
    trainer = model._trainer
    trainer.train_step(_batch(7))
    assert model.last_report.bytes_uploaded == 0


def test_auto_with_half_the_room_streams_about_half(tmp_path):
    from lema.domain.plan.planner import Budget, plan

    path = save_monolithic(build_hf_model_layers(6), tmp_path / "six.safetensors")
    # The CPU standing in for a GPU: weights go through slots (without a budget it would compute in place)
    _, streaming = _train(path, steps=1, strategy=MemoryStrategy.STREAMING, device=CpuDevice(direct_reads=True))
    streamed_all = streaming.last_report.bytes_uploaded
    spec, shape = streaming.spec, streaming.plan().shape
    # The smallest budget at which AUTO keeps half of the decoder layers on the device.
    budget = streaming.plan().device_total
    while len([u for u in plan(spec, attrs.evolve(shape, strategy=MemoryStrategy.AUTO),
                               Budget(device_bytes=budget)).resident_units if u <= spec.n_layers]) < 3:
        budget += spec.largest_layer_bytes // 8
    # checkpointing named: AUTO's resident prefix alone (not traded for kept activations)
    _, half = _train(path, steps=1, strategy=MemoryStrategy.AUTO, vram_budget=budget, gradient_checkpointing=True)
    resident = [u for u in half.plan().resident_units if u <= spec.n_layers]
    assert len(resident) == 3
    assert 0.3 < half.last_report.bytes_uploaded / streamed_all < 0.7


def test_training_within_a_device_capacity_matches_the_plan(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=16, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    path = save_monolithic(LlamaForCausalLM(cfg), tmp_path / "m.safetensors")
    config = LemaConfig(gbi_path=str(path), device="cpu", lora_rank=8, batch_size=2, max_seq_len=16,
                        prefetch_distance=1)
    probe = LemaModel(config, device=CpuDevice(direct_reads=True))  # standing in for a GPU: weights in slots
    budget = probe.plan().device_total
    assert budget < probe.spec.weight_bytes  # the model is larger than the device
    device = CpuDevice(capacity=budget)
    model = LemaModel(LemaConfig(**{**config.to_dict(), "vram_budget": budget}), device=device)
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
    for i in range(2):
        trainer.train_step(_batch(i, batch=2, seq=16, vocab=256))
    peak = device.peak_bytes()
    assert abs(peak - budget) / budget <= 0.10, (peak, budget)


def test_a_budget_below_the_plan_is_refused_before_training(llama_file):
    # With no room at all, the planner reports its smallest plan (activation offload, the
    # smallest tiles): a budget just below that is refused before anything is allocated.
    with pytest.raises(DoesNotFitError) as tiny:
        LemaModel(LemaConfig(gbi_path=str(llama_file), device="cpu", vram_budget=1))
    total = tiny.value.plan.device_total
    with pytest.raises(DoesNotFitError) as info:
        LemaModel(LemaConfig(gbi_path=str(llama_file), device="cpu", vram_budget=int(total * 0.97)))
    assert "fit" in str(info.value).lower()
    assert LemaModel(LemaConfig(gbi_path=str(llama_file), device="cpu", vram_budget=total)).plan().fits
