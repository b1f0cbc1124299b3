"""Two gloo ranks launched by torchrun through the Python API: one process's training, with half the rows each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.data_parallel_run import eval_batches, make_trainer, train
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model
from tests.tolerance import assert_close, forward_floor

WORKER = Path(__file__).resolve().parents[2] / "data_parallel_run.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp")
    model = save_monolithic(build_hf_model("llama", seed=1), folder / "model.safetensors")
    out = folder / "out"
    out.mkdir()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(WORKER),
                          str(model), str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return model, out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_train_evaluate_and_save_like_one_process_with_the_whole_batch(two_ranks):
    model, out, ranks = two_ranks
    trainer = make_trainer(str(model))
    losses = train(trainer)  # one process, every row of every micro-batch
    assert trainer.global_step == 3
    # two ranks are the batch split in two: the floor of the sums over it, through three steps
    floor = forward_floor(trainer.model.spec, 12, extra=3)
    for rank in ranks:
        assert rank["global_step"] == 3
        assert_close(torch.tensor(rank["losses"]), torch.tensor(losses), floor=floor, what="losses")
        eval_loss = trainer.evaluate(eval_batches())["loss"]
        assert_close(torch.tensor(rank["eval"]["loss"]), torch.tensor(eval_loss), floor=floor, what="eval")
    saved = load_file(str(out / "ckpt" / "adapter_model.safetensors"))  # written once, by rank 0
    assert_close(saved, trainer.model.require_lora().state_dict_peft(trainer.model.spec), floor=floor)
    state = json.loads((out / "ckpt" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["micro_step"] == 0


@pytest.mark.slow
def test_each_layers_gradients_start_summing_before_the_previous_layer_computes(two_ranks):
    _, _, ranks = two_ranks
    for rank in ranks:
        backward = [e for e in rank["events"] if e[0] == "grad_allreduce" or e[2:] == ["backward"]]
        # units 3..1 are decoder layers 2..0; the head (unit 4) has no adapters. The last
        # bucket (layer 0, which no layer follows) starts after the pass, carrying the loss
        # sum and the failure flag, so the pass's timeline ends before it.
        assert backward == [["compute_start", 3, "backward"], ["grad_allreduce", [2]],
                            ["compute_start", 2, "backward"], ["grad_allreduce", [1]],
                            ["compute_start", 1, "backward"]]


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_both_naming_the_rank_without_a_hang(two_ranks):
    _, _, (zero, one) = two_ranks
    # Bad token ids on rank 1, before the pass.
    assert one["bad_ids"]["type"] == "ConfigError" and "token ids must be in [0, 128)" in one["bad_ids"]["message"]
    assert zero["bad_ids"] == {"type": "RankFailedError", "message": "rank 1 of 2 failed: " + one["bad_ids"]["message"]}
    # Out of device memory on rank 1, inside the pass (rank 0's rows fit).
    assert one["out_of_memory"]["type"] == "DeviceOutOfMemory"
    assert zero["out_of_memory"]["type"] == "RankFailedError"
    assert zero["out_of_memory"]["message"].startswith("rank 1 of 2 failed: device out of memory")


@pytest.mark.slow
def test_a_micro_step_waits_for_at_most_one_collective_besides_the_gradient_buckets(two_ranks):
    _, _, ranks = two_ranks
    for rank in ranks:
        # Micro-step 0 also hands rank 0's adapters to every rank (after checking that all
        # are well). After it, the token count travels while the forward runs; the loss sum
        # rides in the last gradient bucket on the micro-step that ends an accumulation
        # (odd ones here), and is settled on its own on the others.
        assert rank["blocking"][1:] == [0 if k % 2 else 1 for k in range(1, len(rank["blocking"]))], rank["blocking"]
