"""``lema train`` never loses a run: inputs and existing folders are refused, one run per
folder (a live lock refuses, a stale one is taken over), resume finds the recovery copy an
interrupted save leaves, a missing optimizer state is an error, SIGTERM checkpoints and
exits 143, and a non-finite loss stops with exit 1 and the last good step saved."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lema.adapters.checkpoints.atomic import backup_path
from lema.cli import main
from tests.demo_models import write_data

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))["text"]


def args(model: Path, data: Path, out: Path, *extra: object) -> list[str]:
    return [str(a) for a in ("train", "--model", model, "--data", data, "--out", out, "--batch", "2", "--seq", "32",
                             "--rank", "4", "--lr", "1e-2", "--device", "cpu", *extra)]


def run(*argv: str):
    return CliRunner().invoke(main, list(argv), catch_exceptions=False)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- where a run may write ---------------------------------------------------------------------

def test_out_may_not_be_an_input_or_inside_the_model_folder(tmp_path, model_dir, data):
    before = snapshot(model_dir), data.read_bytes()
    for out in (model_dir, model_dir / "run", data):
        result = run(*args(model_dir, data, out, "--steps", "1"))
        assert result.exit_code == 2 and "input" in error_line(result), result.output
    assert (snapshot(model_dir), data.read_bytes()) == before


def test_a_non_empty_out_or_a_run_without_resume_is_refused_and_untouched(tmp_path, model_dir, data):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = run(*args(model_dir, data, out, "--steps", "1"))
    assert result.exit_code == 2 and "not empty" in error_line(result)
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"keep").hexdigest()}

    done = tmp_path / "run"
    assert run(*args(model_dir, data, done, "--steps", "2", "--save-steps", "1")).exit_code == 0
    before = snapshot(done)
    result = run(*args(model_dir, data, done, "--steps", "4"))
    assert result.exit_code == 2 and "--resume" in error_line(result)
    assert snapshot(done) == before


# -- one run per folder ------------------------------------------------------------------------

_HOLD = ("import sys; from lema.adapters.checkpoints.run_lock import acquire_run_lock; "
         "lock, _ = acquire_run_lock(sys.argv[1]); print('locked', flush=True); sys.stdin.read(); lock.release()")


def test_a_folder_locked_by_a_live_process_is_refused(tmp_path, model_dir, data):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        for extra in ((), ("--resume",)):
            result = run(*args(model_dir, data, out, "--steps", "1", *extra))
            assert result.exit_code == 2, result.output
            assert f"in use by another lema train (process {holder.pid}" in error_line(result)
        assert snapshot(out) == before == {".lema.lock": hashlib.sha256(f"{holder.pid}\n".encode()).hexdigest()}
    finally:
        holder.communicate("", timeout=60)
    assert not (out / ".lema.lock").exists()
    result = run(*args(model_dir, data, out, "--steps", "1"))
    assert result.exit_code == 0, result.output
    assert not (out / ".lema.lock").exists()  # released at the end of the run


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, model_dir, data):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / ".lema.lock").write_text(f"{pid}\n")
    result = run(*args(model_dir, data, out, "--steps", "1"))
    assert result.exit_code == 0, result.output
    assert f"warning: took over a stale lock in {out}: process {pid}" in result.output


# -- resume ------------------------------------------------------------------------------------

def test_resume_uses_the_recovery_copy_an_interrupted_save_left(tmp_path, model_dir, data):
    straight = tmp_path / "straight"
    assert run(*args(model_dir, data, straight, "--steps", "6", "--save-steps", "2")).exit_code == 0
    out = tmp_path / "run"
    assert run(*args(model_dir, data, out, "--steps", "4", "--save-steps", "2")).exit_code == 0
    # A save of final/ killed between its renames: the previous final/ is only in the recovery
    # copy, the new one half-written in a temporary folder of a process that is gone.
    os.replace(out / "final", backup_path(out / "final"))
    partial = out / f".final.tmp-{dead_pid()}-k1ll3d"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    result = run(*args(model_dir, data, out, "--steps", "6", "--save-steps", "2", "--resume"))
    assert result.exit_code == 0, result.output
    assert "restored final from the recovery copy" in result.output
    assert f"resuming from {out / 'final'} at step 4" in result.output
    assert not partial.exists() and not backup_path(out / "final").exists()
    assert_same_adapter(straight / "final", out / "final")


def test_a_missing_optimizer_state_is_an_error_unless_reset_optimizer(tmp_path, model_dir, data):
    out = tmp_path / "run"
    assert run(*args(model_dir, data, out, "--steps", "2")).exit_code == 0
    (out / "final" / "optimizer.safetensors").unlink()
    before = snapshot(out)
    result = run(*args(model_dir, data, out, "--steps", "3", "--resume"))
    assert result.exit_code == 2
    line = error_line(result)
    assert "optimizer.safetensors is missing" in line and "--reset-optimizer" in line
    assert snapshot(out) == before
    result = run(*args(model_dir, data, out, "--steps", "3", "--resume", "--reset-optimizer"))
    assert result.exit_code == 0, result.output
    assert "with a fresh optimizer" in result.output
    assert json.loads((out / "final" / "trainer_state.json").read_text())["global_step"] == 3


# -- stopping ----------------------------------------------------------------------------------

def test_a_non_finite_loss_exits_1_naming_the_step_with_the_last_good_one_saved(tmp_path, model_dir, data):
    out = tmp_path / "run"
    result = run(*args(model_dir, data, out, "--steps", "20", "--lr", "1e30"))
    assert result.exit_code == 1, result.output
    line = error_line(result)
    step = int(line.split("step ")[1].split(":")[0])
    assert "not finite" in line and f"the last good step ({step - 1}) is saved in {out / f'checkpoint-{step - 1}'}" \
        in line
    assert 1 <= step < 20 and not (out / "final").exists()
    state = json.loads((out / f"checkpoint-{step - 1}" / "trainer_state.json").read_text())
    assert state["global_step"] == step - 1 and state["micro_step"] == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step))


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_the_resumed_run_matches_a_straight_one(tmp_path, model_dir, data):
    out = tmp_path / "run"
    extra = ("--lora-dropout", "0.1", "--seed", "5", "--grad-accum", "2")
    command = [sys.executable, "-c", "import sys; from lema.cli import main; sys.exit(main())",
               *args(model_dir, data, out, "--steps", "5000", *extra)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0]
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 143, output
    assert "SIGTERM: stopping after this step" in output and "interrupted at step" in output
    (ckpt,) = out.glob("checkpoint-*")
    step = int(ckpt.name.split("-")[1])
    assert 1 <= step < 5000 and not (out / "final").exists() and not (out / ".lema.lock").exists()
    result = run(*args(model_dir, data, out, "--steps", str(step + 2), *extra, "--resume"))
    assert result.exit_code == 0, result.output
    straight = tmp_path / "straight"
    assert run(*args(model_dir, data, straight, "--steps", str(step + 2), *extra)).exit_code == 0
    assert_same_adapter(straight / "final", out / "final")
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(x)["loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()]


def test_base_model_dropouts_are_named_in_one_warning_line(tmp_path, model_dir, data):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in model_dir.iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((model_dir / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    result = run(*args(folder, data, tmp_path / "run", "--steps", "1"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "attention_dropout=0.1" in lines[0] and "does not apply" in lines[0]
