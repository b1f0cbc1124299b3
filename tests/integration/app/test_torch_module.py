"""LemaModel as a torch.nn.Module: a plain loop, transformers.Trainer, peft's names and files."""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.adapters.devices.cpu import CpuDevice
from lema.errors import ConfigError, OutputError
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model
from tests.tolerance import assert_close, forward_floor, logits_noise, relative_error

STEPS = 5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf = build_hf_model("llama", seed=1)
    hf.save_pretrained(folder / "hf")
    return folder, save_monolithic(hf, folder / "model.safetensors")


def _ids(seed: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _model(path, device_object=None, **overrides) -> LemaModel:
    cfg = dict(gbi_path=str(path), device="cpu", lora_rank=4, seed=3, batch_size=2, max_seq_len=12)
    cfg.update(overrides)
    model = LemaModel(LemaConfig(**cfg), device=device_object)
    model.initialize_lora()
    return model


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # transformers' defaults but the lr


def _train_steps(path, batches, **overrides) -> LemaModel:
    model = _model(path, **overrides)
    trainer = model.get_trainer(_adamw(model.get_trainable_parameters()))
    for ids, labels, mask in batches:
        trainer.train_step(ids, labels=labels, attention_mask=mask)
    return model


def _batches(n: int):
    out = []
    for i in range(n):
        ids = _ids(i)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # right padding in one row
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, :4] = -100  # a prompt that carries no loss
        out.append((ids, labels, mask))
    return out


def test_the_parameters_are_the_adapters_under_peft_names(base):
    model = _model(base[1])
    params = list(model.parameters())
    assert len(params) == len(model.get_trainable_parameters())
    assert all(a is b for a, b in zip(params, model.get_trainable_parameters()))  # the tensors the engine trains
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params)
    assert dict(model.named_parameters()).keys() == model.lora.state_dict_peft(model.spec).keys()
    assert list(model.state_dict())[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not list(model.buffers())  # the base weights are not module state: they stream
    assert model.to("cpu") is model and model.to(torch.float32) is model and model.cpu() is model
    n = sum(p.numel() for p in params)
    assert repr(model) == f"LemaModel(llama, {model.spec.n_layers} layers, LoRA rank 4, {n:,} trainable parameters, on cpu)"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_plain_pytorch_loop_gives_the_adapter_of_train_step(base, dropout):
    batches = _batches(STEPS)
    reference = _train_steps(base[1], batches, lora_dropout=dropout)
    model = _model(base[1], lora_dropout=dropout)
    optimizer = _adamw(model.parameters())
    model.train()
    for ids, labels, mask in batches:
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.config.max_grad_norm)  # as train_step does
        optimizer.step()
        optimizer.zero_grad()
    # The same pass, the same gradients, the same optimizer ops: the same numbers.
    for got, want in zip(model.parameters(), reference.parameters()):
        assert relative_error(got.detach(), want.detach()) <= 1e-6
        assert torch.equal(got, want)


def test_backward_scales_by_the_incoming_gradient_and_accumulates(base):
    ids, labels, mask = _batches(1)[0]
    model = _model(base[1])
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    once = [p.grad.clone() for p in model.parameters()]
    out = model(ids, attention_mask=mask, labels=labels, return_logits=True)
    assert_close(out.logits, model.logits(ids, mask), floor=forward_floor(model.spec, 12))  # the pass's own logits
    assert not out.logits.requires_grad
    (out.loss * 3.0).backward()  # adds 3x onto the .grad already there
    for g, g1 in zip((p.grad for p in model.parameters()), once):
        assert_close(g, 4.0 * g1, floor=forward_floor(model.spec, 12))
    model.zero_grad()
    loss = model(ids, attention_mask=mask, labels=labels).loss
    (loss ** 2).backward()  # d(L^2) = 2 L dL
    for g, g1 in zip((p.grad for p in model.parameters()), once):
        assert_close(g, 2.0 * float(loss.detach()) * g1, floor=forward_floor(model.spec, 12))


def test_transformers_trainer_trains_it_to_the_adapter_of_train_step(base, tmp_path):
    from transformers import Trainer, TrainingArguments

    ids, labels, mask = _batches(1)[0]
    reference = _train_steps(base[1], [(ids, labels, mask)] * STEPS)
    model = _model(base[1])
    fields = TrainingArguments.__dataclass_fields__  # transformers 5 renamed the option
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=1,
                             learning_rate=1e-2, lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0,
                             max_grad_norm=1.0, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             **{checkpointing: True})  # LEMA checkpoints every layer already: accepted
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    trainer = Trainer(model=model, args=args, train_dataset=[batch] * STEPS, eval_dataset=[batch],
                      data_collator=lambda rows: rows[0])
    trainer.train()
    assert trainer.state.global_step == STEPS
    for got, want in zip(model.parameters(), reference.parameters()):
        assert relative_error(got.detach(), want.detach()) <= 1e-5
    loss_sum, n = model.loss(ids, labels, mask)  # Trainer's evaluation: the no-grad forward's mean loss
    assert trainer.evaluate()["eval_loss"] == pytest.approx(loss_sum / n, rel=1e-6)


def test_the_device_budget_and_the_streaming_hold(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=16, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    path = save_monolithic(LlamaForCausalLM(cfg), tmp_path / "m.safetensors")
    config = dict(gbi_path=str(path), device="cpu", lora_rank=8, batch_size=2, max_seq_len=16, prefetch_distance=1)
    probe = LemaModel(LemaConfig(**config), device=CpuDevice(direct_reads=True))
    budget = probe.plan().device_total
    assert budget < probe.spec.weight_bytes  # the model is larger than the device
    device = CpuDevice(capacity=budget)  # an allocation past the plan raises DeviceOutOfMemory
    model = _model(path, device_object=device, **config, vram_budget=budget)
    optimizer = _adamw(model.parameters())
    # The CPU device counts what is allocated inside measuring() (a GPU's allocator counts
    # everything): the user's optimizer states count as train_step's do.
    with device.measuring():
        for i in range(2):
            ids = _ids(i, batch=2, seq=16) * 2
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            streamed = model.last_report.bytes_uploaded
            assert streamed >= model.spec.weight_bytes - model.spec.units[0].nbytes  # every layer streamed
    peak = device.peak_bytes()
    assert abs(peak - budget) / budget <= 0.10, (peak, budget)  # as train_step's peak is to the plan


def test_forward_without_gradients_is_a_forward_pass(base):
    ids, labels, mask = _batches(1)[0]
    model = _model(base[1])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, return_logits=True)
    loss_sum, n = model.loss(ids, labels, mask)
    assert out.loss.grad_fn is None and float(out.loss) == pytest.approx(loss_sum / n, rel=1e-6)
    assert torch.equal(out.logits, model.logits(ids, mask))
    assert model(ids).loss is None and torch.equal(model(ids).logits, model.logits(ids))
    assert model(ids, labels=labels).logits is None  # training never holds the logits unless asked
    with pytest.raises(ConfigError, match="labels"):
        model(ids, return_logits=False)


def test_eval_mode_turns_the_lora_dropout_off(base):
    ids = _ids(0)
    model = _model(base[1], lora_dropout=0.5)
    torch.nn.init.normal_(model.lora.layer(0)["mlp.down_proj"][1])  # B != 0: dropout changes the output
    model.eval()
    first = model(ids, labels=ids).loss.detach()
    assert float(model(ids, labels=ids).loss.detach()) == float(first)
    plain = model(ids).logits
    model.train()
    assert float(model(ids, labels=ids).loss.detach()) != float(first)
    assert not torch.equal(model(ids).logits, plain)  # the logits too, as a torch module in train mode


def test_state_dict_round_trips_and_save_pretrained_is_a_peft_adapter(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, path = base
    trained = _train_steps(path, _batches(3))
    fresh = _model(path)
    fresh.load_state_dict(trained.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), trained.parameters()))
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({})

    trained.save_pretrained(tmp_path / "adapter")
    with pytest.raises(OutputError):
        trained.save_pretrained(tmp_path / "adapter")  # not over something that is there
    trained.save_pretrained(tmp_path / "adapter", overwrite=True)
    hf = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32, attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = _ids(9)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    assert_close(trained(ids).logits, expected, noise=logits_noise(peft_model, ids),
                 floor=forward_floor(trained.spec, ids.shape[1]))


def test_moving_or_casting_is_refused_with_the_fix(base):
    model = _model(base[1])
    with pytest.raises(ConfigError, match="LemaConfig\\(device="):
        model.to("meta")
    with pytest.raises(ConfigError, match="dtype"):
        model.to(torch.float16)
    with pytest.raises(ConfigError, match="LemaConfig"):
        model.half()
    with pytest.raises(AttributeError, match="read-only"):
        model.config.lora_rank = 8
    model.config.use_cache = False  # what transformers.Trainer sets


def test_generate_is_the_generation_tool(base):
    from lema.app.tools.generation import generate

    model = _model(base[1])
    prompt = _ids(5)[:1, :4]
    assert torch.equal(model.generate(prompt, max_new_tokens=3), generate(model, prompt, 3))


def test_accelerate_with_gradient_accumulation_gives_the_adapter_of_train_step(base):
    from accelerate import Accelerator

    batches = _batches(4)
    reference = _train_steps(base[1], batches, gradient_accumulation_steps=2)
    model = _model(base[1])
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, _adamw(model.parameters()))
    for ids, labels, mask in batches:
        with accelerator.accumulate(model):
            accelerator.backward(model(ids, attention_mask=mask, labels=labels).loss)  # divided by 2 inside
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    for got, want in zip(model.parameters(), reference.parameters()):
        assert relative_error(got.detach(), want.detach()) <= 1e-5


def test_transformers_trainer_checkpoints_resume_to_the_same_adapter(base, tmp_path):
    import shutil

    from transformers import Trainer, TrainingArguments

    ids = _ids(0)
    rows = [{"input_ids": ids, "labels": ids}] * 4
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=1,
                             learning_rate=1e-2, lr_scheduler_type="constant", optim="adamw_torch", save_strategy="steps",
                             save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
    straight = _model(base[1])
    Trainer(model=straight, args=args, train_dataset=rows, data_collator=lambda r: r[0]).train()
    shutil.rmtree(tmp_path / "hf" / "checkpoint-4")
    resumed = _model(base[1])
    Trainer(model=resumed, args=args, train_dataset=rows, data_collator=lambda r: r[0]).train(
        resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))  # Trainer's own files: model.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters()))
