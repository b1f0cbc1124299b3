"""``torchrun --nproc-per-node 2 -m lema.cli train``: gloo ranks train as one process with twice the batch."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lema.cli import main
from tests.tolerance import assert_close, forward_floor

LAUNCHER = Path(__file__).resolve().parents[2] / "rank_data_launcher.py"


def args(model: Path, data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--batch", str(batch),
            "--seq", "48", "--rank", "4", "--lr", "1e-2", "--device", "cpu", *extra]


def one_process(*argv: str) -> str:
    result = CliRunner().invoke(main, list(argv), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def torchrun(*argv: str, script: tuple[str, ...] = ("-m", "lema.cli")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *script, *argv],
                          capture_output=True, text=True, timeout=300)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def floor(model: Path) -> float:
    """Two ranks are the batch split in two: the rounding floor of the model's sums over 48
    tokens, through the four steps of these runs (tests/tolerance.py)."""
    from transformers import AutoConfig

    return forward_floor(AutoConfig.from_pretrained(model), 48, extra=4)


def same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], model: Path) -> None:
    assert a.keys() == b.keys()
    assert_close(b, a, floor=floor(model), what="adapter")


def same_losses(a: list[dict], b: list[dict], model: Path) -> None:
    assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]), floor=floor(model),
                 what="losses")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_end_with_the_adapter_of_one_process_with_twice_the_batch(tmp_path, model_dir, data):
    common = ("--steps", "4", "--lr-schedule", "cosine", "--warmup", "1")
    one_process(*args(model_dir, data["text"], tmp_path / "one", 4, *common))
    run = torchrun(*args(model_dir, data["text"], tmp_path / "two", 2, *common))
    assert run.returncode == 0, run.stdout + run.stderr
    same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"), model_dir)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # written once, by rank 0
    same_losses(one, two, model_dir)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert run.stdout.count("plan: streaming on cpu, batch 2") == 1 and run.stdout.count("step 4/4") == 1


@pytest.mark.slow
def test_gradient_accumulation_and_resume_across_a_stop_match_one_process(tmp_path, model_dir, data):
    common = ("--steps", "4", "--grad-accum", "2", "--save-steps", "2", "--seed", "5")
    one_process(*args(model_dir, data["text"], tmp_path / "one", 4, *common))
    two = tmp_path / "two"
    run = torchrun(*args(model_dir, data["text"], two, 2, *common))
    assert run.returncode == 0, run.stdout + run.stderr
    same_adapter(adapter(tmp_path / "one"), adapter(two), model_dir)
    # A stop after step 3: only checkpoint-2 survives, and the metrics of steps 1..3.
    shutil.rmtree(two / "final")
    (two / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(two)[:3]))
    run = torchrun(*args(model_dir, data["text"], two, 2, *common, "--resume"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "resuming from" in run.stdout and "at step 2" in run.stdout
    same_adapter(adapter(tmp_path / "one"), adapter(two), model_dir)
    assert [r["step"] for r in metrics(two)] == [1, 2, 3, 4]
    same_losses(metrics(tmp_path / "one"), metrics(two), model_dir)


@pytest.mark.slow
def test_bad_data_on_one_rank_ends_every_rank_with_one_message(tmp_path, model_dir, data):
    shutil.copyfile(data["text"], tmp_path / "data-0.jsonl")
    lines = data["text"].read_text().splitlines()
    (tmp_path / "data-1.jsonl").write_text("\n".join(lines[:2] + ['{"text": oops}'] + lines[2:]) + "\n")
    out = tmp_path / "run"
    run = torchrun(*args(model_dir, tmp_path / "data-{local_rank}.jsonl", out, 2, "--steps", "2"),
                   script=(str(LAUNCHER),))  # subprocess.run's timeout would raise on a hang
    assert run.returncode != 0
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error:")]
    assert errors == ["Error: rank 1 of 2 failed: " + str(tmp_path / "data-1.jsonl") + ", line 3: invalid JSON "
                      "(Expecting value at column 10); each record needs a \"text\" field, \"prompt\" and "
                      "\"completion\", \"messages\" (chat), \"conversations\" (ShareGPT) or \"instruction\" and "
                      "\"output\" (Alpaca); or choose the format with --format, or map the data's own field names with "
                      "--messages-field, --role-key, --content-key, --roles, --text-field, --prompt-field or "
                      "--completion-field"]
    assert "Traceback (most recent call last):\n  File \"" + str(LAUNCHER) not in run.stderr
    assert not out.exists()  # rank 0 wrote nothing: the ranks agreed to stop before any write


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path, model_dir, data):
    out = tmp_path / "run"
    log = (tmp_path / "log").open("w")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                                 "lema.cli", *args(model_dir, data["text"], out, 2, "--steps", "100000")],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3):
            assert time.monotonic() < deadline and launcher.poll() is None, "the run did not get going"
            time.sleep(0.2)
        workers = psutil.Process(launcher.pid).children()
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGTERM)  # one rank only: the ranks agree to stop
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    output = (tmp_path / "log").read_text()
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1, output
    step = int(saved[0].name.split("-")[1])
    assert output.count("interrupted at step") == 1 and f"interrupted at step {step}: saved" in output
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))
    assert json.loads((saved[0] / "trainer_state.json").read_text())["global_step"] == step
    assert not (out / ".lema.lock").exists()
