"""QLoRA on the streaming engine: folders quantized by transformers + bitsandbytes, as published.

The reference is transformers' own model of the same folder (``Linear4bit`` /
``Linear8bitLt``, in ``train()`` mode: see ``tests.quant_models``) and peft's QLoRA on it.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.errors import ConfigError
from tests.quant_models import hf_quantized
from tests.tolerance import assert_close, forward_floor, logits_noise, on_one_thread, relative_error

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

CASES = [(kind, variant) for kind in ("llama", "qwen2") for variant in ("nf4_dq", "fp4", "int8")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 0.5


def _peft_steps(folder, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's QLoRA adapters after the two SGD steps of the training test."""
    reference = _peft_qlora(folder, init)
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=LR)
    for step in range(2):
        reference(input_ids=_ids(step), labels=_ids(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft.get_peft_model_state_dict(reference)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def _lema(folder, **overrides) -> LemaModel:
    config = dict(model_name_or_path=str(folder), device="cpu", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                  batch_size=2, max_seq_len=12, max_grad_norm=None, seed=5)
    config.update(overrides)
    return LemaModel(LemaConfig(**config))


def _peft_qlora(folder, init: dict[str, torch.Tensor]):
    """peft's QLoRA model of a quantized folder, its adapters set to ``init`` (peft's saved names)."""
    model = peft.get_peft_model(hf_quantized(folder), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                       target_modules=TARGETS, task_type="CAUSAL_LM"))
    result = peft.set_peft_model_state_dict(model, init)
    assert not result.unexpected_keys
    return model.train()


@pytest.mark.parametrize("kind,variant", CASES)
def test_logits_match_transformers_on_the_same_quantized_folder(quantized_model, kind, variant):
    folder = quantized_model(kind, variant)
    reference = hf_quantized(folder)
    ids = _ids(0)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    with _lema(folder) as model:
        assert model.spec.quantization is not None
        ours = model.logits(ids)
    assert_close(ours, expected, noise=logits_noise(reference, ids), floor=forward_floor(reference.config, 12))


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe"])
def test_every_family_reads_a_folder_transformers_quantized(tmp_path, name):
    from tests.family_models import batch, build
    from tests.quant_models import quantized_folder

    folder = quantized_folder(name, "nf4_dq", tmp_path, model=build(name, seed=1))
    reference = hf_quantized(folder, "eager" if name == "gemma2" else "sdpa")
    ids, _ = batch(0)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    with _lema(folder, max_seq_len=ids.shape[1]) as model:
        assert any(u.packed for u in model.spec.units)
        assert_close(model.logits(ids), expected, noise=logits_noise(reference, ids),
                     floor=forward_floor(reference.config, ids.shape[1]))


@pytest.mark.parametrize("kind,variant", CASES)
def test_two_sgd_steps_match_peft_qlora_and_the_adapter_loads_on_the_quantized_base(quantized_model, tmp_path,
                                                                                       kind, variant):
    folder = quantized_model(kind, variant)
    model = _lema(folder)
    model.initialize_lora()
    with torch.no_grad():  # non-zero B, so the first step moves A too
        for p in model.get_trainable_parameters()[1::2]:
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    init = {k: v.clone() for k, v in model.lora.state_dict_peft(model.spec).items()}
    trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=LR))
    for step in range(2):
        trainer.train_step(_ids(step))
    expected = _peft_steps(folder, init)
    again = on_one_thread(lambda: _peft_steps(folder, init))  # peft's QLoRA against itself
    ours = model.lora.state_dict_peft(model.spec)
    assert set(ours) == set(expected)
    floor = forward_floor(model.spec, 12, extra=model.spec.n_layers + 2)  # forward, backward, two steps
    for name, tensor in expected.items():
        assert not torch.equal(tensor, init[name]), name  # both steps moved it
        assert_close(ours[name], tensor, noise=relative_error(again[name], tensor), floor=floor, what=name)

    trainer.save_checkpoint(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder) and config["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(hf_quantized(folder), str(tmp_path / "ckpt")).train()
    ids = _ids(9)
    with torch.no_grad():
        assert_close(model.logits(ids), loaded(input_ids=ids).logits, noise=logits_noise(loaded, ids),
                     floor=forward_floor(model.spec, 12))
    model.close()


def test_the_adapter_of_a_quantized_base_loads_on_the_16_bit_base_and_merges_into_a_dense_model(quantized_model,
                                                                                              tmp_path):
    from transformers import AutoModelForCausalLM

    from lema.app.tools.merge import merge_adapter

    folder = quantized_model("llama", "nf4_dq")
    model = _lema(folder)
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=5e-2))
    for step in range(2):
        trainer.train_step(_ids(step))
    trainer.save_checkpoint(tmp_path / "ckpt")
    dense = AutoModelForCausalLM.from_pretrained(folder.parent / "dense", dtype=torch.float32)
    on_dense = peft.PeftModel.from_pretrained(dense, str(tmp_path / "ckpt"))
    saved = model.lora.state_dict_peft(model.spec)
    loaded = peft.get_peft_model_state_dict(on_dense)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    merged = merge_adapter(folder, tmp_path / "ckpt", tmp_path / "merged", hf_folder=True)
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert not any("4bit" in type(m).__name__ for m in merged_model.modules())
    reference = peft.PeftModel.from_pretrained(hf_quantized(folder), str(tmp_path / "ckpt")).train()
    ids = _ids(3)
    with torch.no_grad():  # the merge rounds W + s*BA once more: one more stage
        assert_close(merged_model(input_ids=ids).logits, reference(input_ids=ids).logits,
                     noise=logits_noise(reference, ids), floor=forward_floor(model.spec, 12, extra=1))
    model.close()


def test_without_bitsandbytes_a_quantized_model_is_one_error_naming_the_extra(quantized_model, monkeypatch):
    from lema.adapters.weights import bnb

    folder = quantized_model("llama", "nf4_dq")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    bnb.functional.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"pip install 'lema\[quant\]'"):
            _lema(folder)
    finally:
        bnb.functional.cache_clear()


@pytest.mark.slow
def test_every_strategy_and_prefetch_depth_trains_the_same_adapter_on_a_quantized_base(quantized_model):
    """Dequantizing once per fetch (a layer reused at the turn is not dequantized again, resident
    layers are dequantized at each compute) changes no number."""
    import attrs

    from lema import MemoryStrategy
    from lema.domain.plan.planner import Budget, plan

    folder = quantized_model("llama", "nf4_dq")

    plans = []

    def train(**overrides) -> list[torch.Tensor]:
        with _lema(folder, **overrides) as model:
            plans.append(model.plan())
            model.initialize_lora()
            trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
            for step in range(2):
                trainer.train_step(_ids(step))
            return [p.detach().clone() for p in model.get_trainable_parameters()]

    reference = train(strategy=MemoryStrategy.RESIDENT)
    with _lema(folder, prefetch_distance=0) as probe:  # the smallest AUTO budget that keeps a layer resident
        shape = attrs.evolve(probe.plan().shape, strategy=MemoryStrategy.AUTO)
        budget = probe.plan().device_total
        while not plan(probe.spec, shape, Budget(budget)).resident_units:
            budget += probe.spec.largest_layer_bytes // 8
    for overrides in (dict(prefetch_distance=0), dict(prefetch_distance=3),
                      # checkpointing named: AUTO's resident layers, not kept activations, are tested here
                      dict(strategy=MemoryStrategy.AUTO, prefetch_distance=0, vram_budget=budget,
                           gradient_checkpointing=True)):
        assert all(torch.equal(a, b) for a, b in zip(reference, train(**overrides))), overrides
    assert plans[-1].resident_units and plans[-1].streamed_units  # AUTO: some of each
    again = on_one_thread(lambda: train(strategy=MemoryStrategy.RESIDENT))  # the reference against itself
    floor = forward_floor(probe.spec, 12, extra=2)  # two AdamW steps
    for a, b, c in zip(reference, train(gradient_checkpointing=False), again):
        assert_close(b, a, noise=relative_error(c, a), floor=floor)
