"""Exact resume and seeding through the Python API: LoRA dropout draws from LEMA's own
generator (seeded by LemaConfig.seed, saved in checkpoints), return_logits, non-finite
losses, and close() releasing every file descriptor."""

from __future__ import annotations

import os

import pytest
import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from lema.errors import CheckpointError, NonFiniteLossError
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model
from tests.tolerance import assert_close, rounding_floor

STEPS = 4
# the trainer's loss against cross-entropy of its logits: the head's sums over the vocabulary (128)
# and the mean over the tokens, each rounded in fp32 (tests/tolerance.py)
LOSS_FLOOR = rounding_floor(torch.float32, 128, depth=2)


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    return save_monolithic(build_hf_model("llama", seed=1), path)


def _ids(i: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(100 + i))


def _config(path, **overrides) -> LemaConfig:
    cfg = dict(gbi_path=str(path), device="cpu", lora_rank=4, lora_dropout=0.1, seed=7, batch_size=2,
               max_seq_len=10, gradient_accumulation_steps=2)
    cfg.update(overrides)
    return LemaConfig(**cfg)


def _optimizer(model: LemaModel) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.get_trainable_parameters(), lr=3e-2)


def _adapters(model: LemaModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.require_lora().state_dict_peft(model.spec).items()}


def _run(config: LemaConfig, micro_steps: int) -> tuple[LemaModel, object]:
    model = LemaModel(config)
    model.initialize_lora()
    trainer = model.get_trainer(_optimizer(model))
    for i in range(micro_steps):
        trainer.train_step(_ids(i))
    return model, trainer


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _disturb_global_rng(seed: int) -> None:
    torch.manual_seed(seed)
    torch.rand(1000)


def test_api_resume_with_dropout_is_bit_identical_through_from_pretrained(tmp_path, llama_file):
    config = _config(llama_file)
    _disturb_global_rng(0)
    straight, _ = _run(config, 2 * STEPS)
    _disturb_global_rng(1)
    _, partial = _run(config, 5)  # 2 optimizer steps and one micro-batch of the third
    partial.save_checkpoint(tmp_path / "ckpt")
    _disturb_global_rng(2)
    resumed = LemaModel.from_pretrained(tmp_path / "ckpt")
    trainer = resumed.get_trainer(_optimizer(resumed))
    assert (trainer.global_step, trainer.micro_step) == (2, 1)
    torch.rand(77)  # the caller's own draws between restore and training change nothing
    for i in range(5, 2 * STEPS):
        trainer.train_step(_ids(i))
    _assert_same(_adapters(straight), _adapters(resumed))


def test_api_resume_with_dropout_is_bit_identical_through_load_checkpoint(tmp_path, llama_file):
    config = _config(llama_file)
    straight, _ = _run(config, 2 * STEPS)
    _, partial = _run(config, 4)
    partial.save_checkpoint(tmp_path / "ckpt")
    model = LemaModel(config)
    model.initialize_lora(seed=999)  # other adapters and dropout stream: all replaced by the checkpoint
    trainer = model.get_trainer(_optimizer(model))
    trainer.load_checkpoint(tmp_path / "ckpt")
    assert trainer.global_step == 2
    for i in range(4, 2 * STEPS):
        trainer.train_step(_ids(i))
    _assert_same(_adapters(straight), _adapters(model))


def test_without_restoring_the_dropout_stream_the_resume_differs(tmp_path, llama_file):
    """The check above can fail: a resume that redraws dropout from a fresh stream diverges."""
    config = _config(llama_file)
    straight, _ = _run(config, 2 * STEPS)
    _, partial = _run(config, 4)
    partial.save_checkpoint(tmp_path / "ckpt")
    model = LemaModel(config)
    model.initialize_lora()
    trainer = model.get_trainer(_optimizer(model))
    trainer.load_checkpoint(tmp_path / "ckpt")
    model.dropout_generator.manual_seed(12345)
    for i in range(4, 2 * STEPS):
        trainer.train_step(_ids(i))
    a, b = _adapters(straight), _adapters(model)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_same_config_seed_gives_the_same_adapters_whatever_the_global_seed(llama_file):
    config = _config(llama_file)
    torch.manual_seed(1)
    first, _ = _run(config, 4)
    torch.manual_seed(2)
    torch.rand(123)
    second, _ = _run(config, 4)
    _assert_same(_adapters(first), _adapters(second))
    other, _ = _run(_config(llama_file, seed=8), 4)
    a, b = _adapters(first), _adapters(other)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_training_neither_reads_nor_moves_the_global_rng(llama_file):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _run(_config(llama_file), 3)
    assert torch.equal(torch.rand(3), expected)


def test_a_checkpoint_without_optimizer_state_needs_reset_optimizer(tmp_path, llama_file):
    _, trainer = _run(_config(llama_file), 4)
    trainer.save_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "optimizer.safetensors").unlink()
    model = LemaModel.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing.*reset_optimizer"):
        model.get_trainer(_optimizer(model))
    trainer = model.get_trainer(_optimizer(model), reset_optimizer=True)
    assert trainer.global_step == 2 and not trainer.optimizer.state
    trainer.train_step(_ids(4))


def test_return_logits_are_the_ones_the_loss_came_from_before_the_step(llama_file):
    model = LemaModel(_config(llama_file, lora_dropout=0.0, gradient_accumulation_steps=1))
    model.initialize_lora()
    trainer = model.get_trainer(_optimizer(model))
    trainer.train_step(_ids(0))  # B is no longer zero: the adapters take part
    ids = _ids(1)
    before = model.logits(ids)
    logits, loss = trainer.train_step(ids, return_logits=True)
    assert trainer.global_step == 2
    assert torch.equal(logits, before)
    assert not torch.equal(model.logits(ids), before)  # the step did change the model
    expected = torch.nn.functional.cross_entropy(before[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert_close(torch.tensor(loss), expected, floor=LOSS_FLOOR)


def test_return_logits_with_dropout_are_the_dropped_out_forward(llama_file):
    model = LemaModel(_config(llama_file, gradient_accumulation_steps=1, lora_dropout=0.5))
    model.initialize_lora()
    trainer = model.get_trainer(_optimizer(model))
    trainer.train_step(_ids(0))
    ids = _ids(1)
    logits, loss = trainer.train_step(ids, return_logits=True)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert_close(torch.tensor(loss), expected, floor=LOSS_FLOOR)


def test_a_non_finite_loss_raises_without_stepping_the_optimizer(llama_file):
    model = LemaModel(_config(llama_file, gradient_accumulation_steps=2))
    model.initialize_lora()
    trainer = model.get_trainer(_optimizer(model))
    trainer.train_step(_ids(0))
    trainer.train_step(_ids(1))
    trainer.train_step(_ids(2))  # first micro-batch of step 2
    names = [n for n, _ in model.require_lora().named_parameters()]
    poisoned = names.index("layers.1.mlp.down_proj.lora_B")
    with torch.no_grad():
        model.get_trainable_parameters()[poisoned][0, 0] = float("nan")
    params_before = [p.detach().clone() for p in model.get_trainable_parameters()]
    state_before = [v["exp_avg"].clone() for v in trainer.optimizer.state.values()]
    with pytest.raises(NonFiniteLossError, match="step 2: the loss is nan") as info:
        trainer.train_step(_ids(3))
    assert info.value.step == 2 and info.value.value != info.value.value
    assert trainer.global_step == 1 and trainer.micro_step == 0
    assert all(p.grad is None for p in model.get_trainable_parameters())
    for a, b in zip(params_before, model.get_trainable_parameters()):
        assert torch.equal(a.nan_to_num(7.0), b.detach().nan_to_num(7.0))
    assert [v["exp_avg"] for v in trainer.optimizer.state.values()] != []
    for before, v in zip(state_before, trainer.optimizer.state.values()):
        assert torch.equal(v["exp_avg"], before)


def test_a_non_finite_gradient_is_refused_too(llama_file):
    model = LemaModel(_config(llama_file, gradient_accumulation_steps=1))
    model.initialize_lora()
    trainer = model.get_trainer(_optimizer(model))
    names = [n for n, _ in model.require_lora().named_parameters()]
    with torch.no_grad():
        # A NaN in a query's adapter: CPU SDPA's fused softmax keeps the loss finite, the
        # gradients are not.
        model.get_trainable_parameters()[names.index("layers.0.self_attn.q_proj.lora_B")][0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 1: the (gradient norm|loss) is nan"):
        trainer.train_step(_ids(0))
    assert trainer.global_step == 0 and not trainer.optimizer.state


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step(llama_file):
    model = LemaModel(_config(llama_file, gradient_accumulation_steps=1, max_grad_norm=None))
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=1e30))
    with pytest.raises(NonFiniteLossError, match=r"step \d+: the (loss|gradient norm) is (nan|inf)"):
        for i in range(20):
            trainer.train_step(_ids(i))
    assert trainer.global_step >= 1


@pytest.mark.slow
def test_open_and_close_a_thousand_models_keeps_the_fd_count_flat(tmp_path):
    fds = "/proc/self/fd"
    if not os.path.isdir(fds):
        pytest.skip("needs /proc/self/fd")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    path = save_monolithic(tiny, tmp_path / "tiny.safetensors")
    config = _config(path, strategy=MemoryStrategy.STREAMING)
    for _ in range(3):  # warm up: lazily opened library files (torch, tokenizers) come first
        with LemaModel(config):
            pass
    before = len(os.listdir(fds))
    for i in range(1000):
        if i % 2:
            with LemaModel(config) as model:
                model.logits(_ids(0)[:, :4] % 32) if i % 100 == 1 else None
        else:
            model = LemaModel(config)
            model.close()
            model.close()  # twice is fine
        del model
    assert len(os.listdir(fds)) <= before
    for strategy in (MemoryStrategy.RESIDENT, MemoryStrategy.AUTO):
        for _ in range(50):
            with LemaModel(_config(path, strategy=strategy)):
                pass
    assert len(os.listdir(fds)) <= before
