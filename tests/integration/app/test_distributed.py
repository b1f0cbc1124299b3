"""Ranks from torchrun's environment, and the data-parallel path of a trainer in a one-rank group."""

from __future__ import annotations

import pytest
import torch

from lema.app.parallel import distributed
from lema.app.parallel.data_parallel import DataParallel
from lema.app.parallel.rank_agreement import is_agreed, reported_elsewhere, settle
from lema.errors import ConfigError
from tests.data_parallel_run import global_batches, make_trainer
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model
from tests.tolerance import assert_close, forward_floor


def test_ranks_come_from_torchruns_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.from_env(env) == distributed.Ranks(rank=3, world=4, local_rank=1, local_world=2)
    assert distributed.from_env({}) == distributed.Ranks()
    assert not distributed.from_env({}).distributed and distributed.from_env(env).distributed


@pytest.mark.parametrize("env, words", [({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not a number"),
                                         ({"RANK": "2", "WORLD_SIZE": "2"}, "do not describe a rank"),
                                         ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "3"}, "launch with torchrun")])
def test_a_broken_environment_is_a_config_error(env, words):
    with pytest.raises(ConfigError, match=words):
        distributed.from_env(env)


def test_outside_torchrun_start_changes_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.start("cpu") == (distributed.Ranks(), "cpu")
    assert not torch.distributed.is_initialized() and not distributed.active()


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    return save_monolithic(build_hf_model("llama", seed=1), tmp_path_factory.mktemp("llama") / "model.safetensors")


@pytest.fixture
def group():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_the_data_parallel_steps_of_one_rank_equal_the_plain_trainer(llama_file, group):
    plain, parallel = make_trainer(str(llama_file)), make_trainer(str(llama_file))
    dp = DataParallel(parallel, bucket_bytes=1)
    for batch in global_batches():
        _, expected = plain.train_step(batch["input_ids"], labels=batch["labels"],
                                       attention_mask=batch["attention_mask"])
        _, got = dp.micro_step(batch["input_ids"], batch["labels"], batch["attention_mask"])
        assert_close(torch.tensor(got), torch.tensor(expected), floor=forward_floor(plain.model.spec, 12, extra=1))
    assert parallel.global_step == plain.global_step == 3
    floor = forward_floor(plain.model.spec, 12, extra=3)  # three steps
    for a, b in zip(plain.model.get_trainable_parameters(), parallel.model.get_trainable_parameters()):
        assert_close(b, a, floor=floor)
    assert any(e[0] == "grad_allreduce" for e in parallel.last_report.timeline)
    empty = torch.zeros((0, 1), dtype=torch.long)
    dp.micro_step(empty, empty, empty)  # no rows here this micro-step: still takes part
    assert parallel.micro_step == 1


def test_a_failure_is_agreed_raised_as_itself_where_it_happened_and_drops_the_accumulation(llama_file, group):
    trainer = make_trainer(str(llama_file))
    dp = DataParallel(trainer)
    dp.micro_step(torch.tensor([[1, 2, 3]]), None, None)  # half of an accumulation
    assert trainer.micro_step == 1
    with pytest.raises(ConfigError, match="token ids must be in") as caught:
        dp.micro_step(torch.tensor([[1, 2, 500]]), None, None)
    assert is_agreed(caught.value) and not reported_elsewhere(caught.value)  # rank 0 prints it
    assert trainer.micro_step == 0 and all(p.grad is None for p in trainer.model.get_trainable_parameters())
    assert settle(None, [2.0, 3.0]) == [2.0, 3.0]


class _PassFails:
    """A trainer (the LocalTrainer DataParallel drives) whose pass fails after its backward
    once ``fail`` is set: the gradient buckets have started, the loss sum is known."""

    def __init__(self, trainer) -> None:
        self._trainer, self.fail = trainer, False

    def __getattr__(self, name):
        return getattr(self._trainer, name)

    def run_batch(self, batch, token_count=None, keep_logits=False):
        out = self._trainer.run_batch(batch, token_count, keep_logits)
        if self.fail:
            raise RuntimeError("planted: the pass failed after its backward")
        return out


def test_a_failure_at_an_accumulations_end_travels_in_the_last_gradient_bucket(llama_file, group):
    """The micro-step that ends an accumulation settles nothing on its own: its failure flag
    rides in the last gradient bucket, and the failure is agreed (only the messages are
    gathered) and drops the accumulation; the next micro-step runs as usual."""
    trainer = make_trainer(str(llama_file))
    wrapped = _PassFails(trainer)
    dp = DataParallel(wrapped, bucket_bytes=1)
    ids = torch.tensor([[1, 2, 3, 4]])
    dp.micro_step(ids, None, None)  # half of an accumulation
    wrapped.fail = True
    issued = []
    with distributed.observe_collectives(lambda name, blocking: issued.append((name, blocking))):
        with pytest.raises(RuntimeError, match="planted") as caught:
            dp.micro_step(ids, None, None)
    assert is_agreed(caught.value)
    assert [name for name, blocking in issued if blocking] == ["all_gather"]  # the messages, nothing else
    assert trainer.micro_step == 0 and trainer.global_step == 0
    assert all(p.grad is None for p in trainer.model.get_trainable_parameters())
    wrapped.fail = False
    dp.micro_step(ids, None, None)
    assert trainer.micro_step == 1
