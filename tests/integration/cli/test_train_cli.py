"""``lema train``: every data format, metrics, checkpoints, exact resume, plan and data errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lema.cli import main
from tests.demo_models import tiny_llama_folder

pytest.importorskip("transformers")

METRIC_FIELDS = {"step", "loss", "lr", "tokens_per_s", "device_peak_bytes"}


def run(*args: str) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--batch", "2", "--seq", "48",
            "--rank", "4", "--lr", "1e-2", "--device", "cpu", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("fmt", ["txt", "text", "pc"])
def test_trains_on_each_format_and_writes_metrics_and_final_checkpoint(tmp_path, model_dir, data, fmt):
    out = tmp_path / "run"
    result = run(*base_args(model_dir, data[fmt], out, "--steps", "4", "--save-steps", "2"))
    assert result.exit_code == 0, result.output
    assert "plan: streaming on cpu" in result.output
    assert {"txt": "text,", "text": "jsonl-text,", "pc": "prompt-completion,"}[fmt] in result.output
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(METRIC_FIELDS <= set(r) for r in rows)
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["device_peak_bytes"] > 0 for r in rows)
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    final = out / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json",
            "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == 4


def test_epochs_sets_the_step_count_and_the_loss_falls(tmp_path, model_dir, data):
    out = tmp_path / "run"
    result = run(*base_args(model_dir, data["pc"], out, "--epochs", "5", "--lr", "3e-2"))
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    assert len(rows) == 30  # 12 examples / batch 2 = 6 batches per epoch
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])


def test_resume_gives_the_same_adapter_as_training_straight_through(tmp_path, model_dir, data):
    extra = ("--steps", "6", "--grad-accum", "2", "--lr-schedule", "cosine", "--warmup", "2", "--seed", "3")
    straight = tmp_path / "straight"
    assert run(*base_args(model_dir, data["text"], straight, *extra)).exit_code == 0
    resumed = tmp_path / "resumed"
    assert run(*base_args(model_dir, data["text"], resumed, *extra, "--save-steps", "2")).exit_code == 0
    # A crash after step 3: only checkpoint-2 survives (and metrics for steps 1..3).
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoint-4")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    result = run(*base_args(model_dir, data["text"], resumed, *extra, "--resume"))
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "at step 2" in result.output
    a, b = adapter(straight / "final"), adapter(resumed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]


def test_resume_without_a_checkpoint_and_reuse_of_an_out_dir_are_errors(tmp_path, model_dir, data):
    out = tmp_path / "run"
    result = run(*base_args(model_dir, data["txt"], out, "--steps", "1", "--resume"))
    assert result.exit_code == 2 and "no usable checkpoint in" in result.output
    assert run(*base_args(model_dir, data["txt"], out, "--steps", "1")).exit_code == 0
    result = run(*base_args(model_dir, data["txt"], out, "--steps", "2"))
    assert result.exit_code == 2 and "--resume" in result.output


def test_a_plan_that_does_not_fit_exits_1_and_says_what_would(tmp_path, model_dir, data):
    result = run(*base_args(model_dir, data["txt"], tmp_path / "run", "--steps", "1", "--batch", "64",
                            "--seq", "256", "--vram", "2M"))
    assert result.exit_code == 1
    assert "DOES NOT FIT" in result.output
    assert re.search(r"would fit with .*--(batch|seq) \d+", result.output), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "final").exists()


def test_offload_activations_option_trains_with_inputs_in_host_memory(tmp_path, model_dir, data):
    """--offload-activations: the same adapter as without (offload moves bytes, not math)."""
    outs = {}
    for flag in ("--offload-activations", "--no-offload-activations"):
        out = tmp_path / flag
        # prefetch 0: of the tiny model's 2 layers, the first one's input leaves the device
        result = run(*base_args(model_dir, data["txt"], out, "--steps", "2", "--prefetch", "0", flag))
        assert result.exit_code == 0, result.output
        assert ("activation offload" in result.output) == (flag == "--offload-activations")  # the plan line
        outs[flag] = adapter(out / "final")
    a, b = outs.values()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "--offload-activations" / "final" / "trainer_state.json").read_text()
                      )["config"]["offload_activations"] is True


@pytest.mark.parametrize("name,content,where", [
    ("empty.txt", "", "empty.txt: the file is empty"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n', "bad.jsonl, line 2: invalid JSON"),
    ("fields.jsonl", '{"text": "fine"}\n{"content": "x"}\n', 'fields.jsonl, line 2: missing field "text"'),
    ("latin1.txt", b"ok\nna\xefve\n", "latin1.txt, line 2: not valid UTF-8"),
])
def test_bad_data_exits_2_with_one_error_line_naming_file_and_line(tmp_path, model_dir, name, content, where):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run(*base_args(model_dir, path, tmp_path / "run", "--steps", "1"))
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and where in errors[0], result.output
    assert "Traceback" not in result.output


def test_missing_tokenizer_says_to_pass_tokenizer(tmp_path, model_dir, data):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(model_dir / name, bare / name)
    result = run(*base_args(bare, data["txt"], tmp_path / "run", "--steps", "1"))
    assert result.exit_code == 2 and "--tokenizer" in result.output
    result = run(*base_args(bare, data["txt"], tmp_path / "run", "--steps", "1", "--tokenizer", str(model_dir)))
    assert result.exit_code == 0, result.output


def test_a_converted_file_trains_with_the_tokenizer_beside_it(tmp_path, model_dir, data):
    from lema.app.tools.convert import prepare_monolithic_safetensors

    weights = prepare_monolithic_safetensors(model_dir, tmp_path / "m" / "tiny.safetensors", device="cpu")
    result = run(*base_args(weights, data["txt"], tmp_path / "run", "--steps", "1", "--tokenizer", str(model_dir)))
    assert result.exit_code == 0, result.output


def test_a_bin_folder_is_converted_once_into_the_cache(tmp_path, data, monkeypatch):
    folder = tiny_llama_folder(tmp_path / "bin_model", weights="bin")
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    result = run(*base_args(folder, data["txt"], tmp_path / "run1", "--steps", "1"))
    assert result.exit_code == 0, result.output
    assert "converting" in result.output
    (cached,) = (tmp_path / "cache").glob("*.safetensors")
    result = run(*base_args(folder, data["txt"], tmp_path / "run2", "--steps", "1"))
    assert result.exit_code == 0 and "converting" not in result.output
    assert list((tmp_path / "cache").glob("*.safetensors")) == [cached]


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_continues(tmp_path, model_dir, data):
    out = tmp_path / "run"

    def interrupt_after_first_step() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=interrupt_after_first_step, daemon=True)
    watcher.start()
    result = run(*base_args(model_dir, data["txt"], out, "--steps", "500"))
    watcher.join()
    assert result.exit_code == 130, result.output
    assert "interrupted at step" in result.output and "--resume" in result.output
    (ckpt,) = out.glob("checkpoint-*")
    step = int(ckpt.name.split("-")[1])
    assert 1 <= step < 500 and not (out / "final").exists()
    result = run(*base_args(model_dir, data["txt"], out, "--steps", str(step + 2), "--resume"))
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 3))


def test_a_float16_run_logs_its_loss_scale_and_keeps_it_in_the_checkpoint(tmp_path, model_dir, data):
    """--dtype float16 computes in float16, so the run scales its loss (issue 23): each
    metrics record and log line says the scale, and the checkpoint keeps it."""
    out = tmp_path / "run"
    result = run(*base_args(model_dir, data["text"], out, "--steps", "2", "--dtype", "float16"))
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    assert [r["loss_scale"] for r in rows] == [65536.0, 65536.0] and all(r["skipped_steps"] == 0 for r in rows)
    assert "loss_scale 65536" in result.output
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] == 65536.0 and state["loss_scale"]["growth_tracker"] == 2
    plain = tmp_path / "plain"
    assert run(*base_args(model_dir, data["text"], plain, "--steps", "1")).exit_code == 0
    assert "loss_scale" not in metrics(plain)[0]
