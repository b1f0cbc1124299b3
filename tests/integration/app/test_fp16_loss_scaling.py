"""float16 runs scale their loss as torch.amp.GradScaler does (issue 23): on exactly when the
base computes in float16; the same scales and skipped steps as GradScaler on the same model
and data; gradients that underflow in float16 without it train with it; exact resume.

The device is a CPU whose traits say it has no native bfloat16 (a pre-Ampere GPU's
stand-in), so a float16 model file computes in float16 there."""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.adapters.devices.cpu import CpuDevice
from lema.app.training.loss_scaling import LossScaler

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 12


class NoBf16Cpu(CpuDevice):
    """The CPU, saying it computes no bfloat16 (as a pre-Ampere GPU's adapter says)."""

    @property
    def traits(self):
        return attrs.evolve(super().traits, bf16=False)


def _folder(root, head_scale: float = 1.0):
    from tests.tiny_models import build_hf_model

    hf = build_hf_model("llama", seed=2)
    with torch.no_grad():
        hf.lm_head.weight.mul_(head_scale)
    folder = root / f"fp16-{head_scale}"
    hf.to(torch.float16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("fp16"))


def _lema(folder, device=None, **overrides) -> LemaModel:
    config = dict(model_name_or_path=str(folder), device="cpu", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                  batch_size=2, max_seq_len=SEQ, seed=5, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float16 warning (tests/unit/domain/model/test_precision.py)
        return LemaModel(LemaConfig(**{**config, **overrides}), device=device or NoBf16Cpu())


def _ids(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(100 + step))


def _start(model: LemaModel) -> dict[str, torch.Tensor]:
    model.initialize_lora()
    with torch.no_grad():  # non-zero B, so every step moves A and B
        for p in model.get_trainable_parameters()[1::2]:
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return {k: v.clone() for k, v in model.lora.state_dict_peft(model.spec).items()}


def test_the_scaler_is_on_exactly_when_the_base_computes_in_float16(fp16_folder):
    cases = [(NoBf16Cpu(), "auto", torch.float16), (CpuDevice(), "float16", torch.float16),
             (CpuDevice(), "auto", torch.bfloat16), (NoBf16Cpu(), "float32", torch.float32),
             (NoBf16Cpu(), "bfloat16", torch.bfloat16)]
    for device, dtype, computes in cases:
        with _lema(fp16_folder, device, dtype=dtype) as model:
            model.initialize_lora()
            trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1))
            assert model.compute_dtype == computes
            assert (trainer.loss_scale == 2.0**16) if computes == torch.float16 else trainer.loss_scale is None


def _scaler_run(trainer, steps: int) -> list[tuple[float, bool]]:
    out = []
    for step in range(steps):
        before = trainer.scaler.skipped
        trainer.train_step(_ids(step))
        out.append((trainer.loss_scale, trainer.scaler.skipped > before))
    return out


def test_scales_and_skipped_steps_are_gradscalers_on_the_same_model_and_data(fp16_folder):
    """A scale far too large to start: GradScaler skips and halves until the float16
    gradients fit, then grows every 2 clean steps (growth_interval=2 for the test) and backs
    off when a grown scale overflows again. LEMA takes the same steps."""
    init, steps = 2.0**24, 12
    model = _lema(fp16_folder)
    start = _start(model)
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
    trainer.scaler = LossScaler(init_scale=init, growth_interval=2)
    ours = _scaler_run(trainer, steps)
    model.close()

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(fp16_folder, dtype=torch.float16, attn_implementation="sdpa")
    reference = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                                        task_type="CAUSAL_LM"))
    assert not peft.set_peft_model_state_dict(reference, start).unexpected_keys
    reference.train()
    params = [p for p in reference.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)  # peft keeps the adapters in fp32, as LEMA does
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_interval=2)
    expected = []
    for step in range(steps):
        ids = _ids(step)
        scaler.scale(reference(input_ids=ids, labels=ids).loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        expected.append((scaler.get_scale(), scaler.get_scale() < before))
    print(ours)
    assert ours == expected
    assert any(skipped for _, skipped in ours) and any(not skipped for _, skipped in ours)
    assert any(b[0] > a[0] for a, b in zip(ours, ours[1:]))  # it grew too


def test_gradients_that_underflow_in_float16_train_with_the_scale(tmp_path):
    """A head whose weights are 2e-6 of the usual: the gradient reaching the float16
    activations is ~1e-8, below half of float16's smallest number, so without loss scaling every
    adapter gradient is zero and B (zero at the start) never moves. With the scale (2**16)
    the gradients are there and the adapters move."""
    folder = _folder(tmp_path, head_scale=2e-6)
    moved = {}
    for scaling in (False, True):
        with _lema(folder) as model:
            model.initialize_lora()  # B = 0: only a gradient moves it
            trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
            assert trainer.scaler is not None
            if not scaling:
                trainer.scaler = None  # float16 as LEMA computed it before: no loss scaling
            for step in range(3):
                trainer.train_step(_ids(step))
            b = model.get_trainable_parameters()[1::2]
            moved[scaling] = max(float(p.abs().max()) for p in b)
            assert not scaling or trainer.scaler.skipped == 0
    assert moved[False] == 0.0  # underflowed: the adapters did not train
    assert moved[True] > 1e-3


def test_resume_is_exact_with_the_loss_scale(fp16_folder, tmp_path):
    """Saved mid-run (the scale backed off and grew since the start, the growth counter
    part-way), then resumed in a new model: the same scales, skipped steps and adapters, bit
    for bit, as the run that went on."""
    def trainer_of(model):
        return model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))

    model = _lema(fp16_folder)
    _start(model)
    trainer = trainer_of(model)
    trainer.scaler = LossScaler(init_scale=2.0**21, growth_interval=3)
    first = _scaler_run(trainer, 4)
    assert any(skipped for _, skipped in first) and trainer.scaler.growth_tracker > 0
    trainer.save_checkpoint(tmp_path / "ckpt")
    went_on = [(s, k) for s, k in _later(trainer, 4)]
    after = {k: v.clone() for k, v in model.lora.state_dict_peft(model.spec).items()}
    model.close()

    resumed = _lema(fp16_folder)
    resumed.initialize_lora()
    again = trainer_of(resumed)
    again.load_checkpoint(tmp_path / "ckpt")
    assert again.scaler.state_dict() == LossScaler(init_scale=2.0**21, growth_interval=3).state_dict() | {
        "scale": first[-1][0], "growth_tracker": trainer_state_tracker(tmp_path / "ckpt"),
        "skipped": sum(skipped for _, skipped in first)}
    assert [(s, k) for s, k in _later(again, 4)] == went_on
    ours = resumed.lora.state_dict_peft(resumed.spec)
    assert all(torch.equal(ours[k], after[k]) for k in after)
    resumed.close()


def _later(trainer, steps: int) -> list[tuple[float, bool]]:
    out = []
    for step in range(10, 10 + steps):
        before = trainer.scaler.skipped
        trainer.train_step(_ids(step))
        out.append((trainer.loss_scale, trainer.scaler.skipped > before))
    return out


def trainer_state_tracker(path) -> int:
    import json

    return json.loads((path / "trainer_state.json").read_text())["loss_scale"]["growth_tracker"]
