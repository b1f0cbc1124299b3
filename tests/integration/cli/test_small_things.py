"""Issue 28 point 5: the small things, each with its check."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lema.cli import main
from tests.chat_models import ANSWER, chat_tokenizer

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[3]


def train(*args: str):
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--batch", "2", "--seq", "48",
            "--rank", "4", "--device", "cpu", *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overwrite_replaces_an_earlier_run_and_is_refused_with_resume(tmp_path, model_dir, data):
    out = tmp_path / "run"
    assert train(*args(model_dir, data["pc"], out, "--steps", "2")).exit_code == 0
    (out / "notes.txt").write_text("mine")
    again = train(*args(model_dir, data["pc"], out, "--steps", "1"))
    assert again.exit_code == 2 and "--overwrite" in again.output
    both = train(*args(model_dir, data["pc"], out, "--steps", "1", "--overwrite", "--resume"))
    assert both.exit_code == 2 and "not both" in both.output
    replaced = train(*args(model_dir, data["pc"], out, "--steps", "1", "--overwrite-output-dir"))
    assert replaced.exit_code == 0, replaced.output
    assert "--overwrite: removed" in replaced.output and not (out / "notes.txt").exists()
    assert [r["step"] for r in records(out)] == [1]
    # an input inside the folder it would clear is refused
    inside = out / "data.jsonl"
    inside.write_text(data["pc"].read_text())
    refused = train(*args(model_dir, inside, out, "--steps", "1", "--overwrite"))
    assert refused.exit_code == 2 and inside.is_file()


def test_metrics_have_grad_norm_and_epoch_and_logging_steps_averages_the_window(tmp_path, model_dir, data):
    every = tmp_path / "every"
    assert train(*args(model_dir, data["pc"], every, "--steps", "4")).exit_code == 0
    rows = records(every)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 for r in rows)
    assert [r["epoch"] for r in rows] == [round(s / 6, 4) for s in (1, 2, 3, 4)]  # 12 examples, batch 2
    windowed = tmp_path / "windowed"
    result = train(*args(model_dir, data["pc"], windowed, "--steps", "4", "--logging-steps", "2"))
    assert result.exit_code == 0, result.output
    logged = records(windowed)
    assert [r["step"] for r in logged] == [2, 4] and all(r["logged_steps"] == 2 for r in logged)
    for r in logged:  # the window's mean loss: the same steps as the run logging every step
        mean = (rows[r["step"] - 2]["loss"] + rows[r["step"] - 1]["loss"]) / 2
        assert r["loss"] == mean  # the same ops on the same (bit-identical, CPU) losses
    lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and "ETA" in lines[0] and "elapsed" in lines[0] and "grad_norm" in lines[0]


def test_the_progress_bar_keeps_steps_elapsed_and_eta_at_80_columns():
    from rich.console import Console

    from lema.cli.progress import TrainingProgress

    progress = TrainingProgress(1000, 0)
    buf = io.StringIO()
    progress.console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    progress.live = True
    with progress:
        progress.update(123, {"loss": 5.74461, "tokens_per_s": 1234.0, "device_peak_bytes": 17152,
                              "device_peak_counts_compute": False})
        shown = io.StringIO()  # the bar's line as the terminal gets it, rendered once more at 80 columns
        Console(file=shown, width=80, color_system=None).print(progress._bar.make_tasks_table(progress._bar.tasks))
        line = shown.getvalue().splitlines()[-1]
    assert len(line) <= 80
    assert "123/1000" in line and "0:00:" in line and "ETA" in line and "loss 5.7446" in line


def test_convert_says_it_wrote_the_tokenizer_folder(tmp_path, model_dir):
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(main, ["convert", str(model_dir), str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"tokenizer folder {tmp_path / 'm.tokenizer'}" in result.output and (tmp_path / "m.tokenizer").is_dir()


def test_a_model_typo_is_said_before_torch_is_imported(tmp_path):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom lema.cli import main\n"
            f"r = CliRunner().invoke(main, ['train', '--model', 'lama.safetensors', '--data', 'd.jsonl', '--out', "
            f"{str(tmp_path / 'o')!r}])\n"
            "print(r.exit_code, 'torch' in sys.modules)\nprint(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    first, message = out.stdout.split("\n", 1)
    assert first == "2 False", out.stdout + out.stderr
    assert "--model: lama.safetensors: no such file or folder" in message


def test_an_empty_chat_reply_prints_no_empty_line(capsys):
    from lema.cli.generate_cmd import _TextStream

    tok = chat_tokenizer()
    printer = _TextStream(tok, "")
    printer.add(tok.eos_token_id)  # the model ended its turn at once: a special token, no text
    printer.flush()
    assert printer.wrote is False and capsys.readouterr().out == ""
    printer = _TextStream(tok, "")
    for token in tok(ANSWER, add_special_tokens=False)["input_ids"]:
        printer.add(token)
    printer.flush()
    assert printer.wrote is True and capsys.readouterr().out == ANSWER


def test_resume_with_more_steps_after_a_finished_cosine_run_does_not_train_at_lr_0(tmp_path, model_dir, data):
    out = tmp_path / "run"
    assert train(*args(model_dir, data["pc"], out, "--steps", "3", "--lr-schedule", "cosine")).exit_code == 0
    assert records(out)[-1]["lr"] > 0  # the last step's LR; the schedule ends at 0 after it
    more = train(*args(model_dir, data["pc"], out, "--steps", "6", "--lr-schedule", "cosine", "--resume"))
    assert more.exit_code == 0, more.output
    assert "warning: --resume with --steps 6" in more.output and "left the LR at 0" in more.output
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    from lema.app.training.train_loop import lr_lambda

    assert rows[3]["lr"] == 2e-4 * lr_lambda("cosine", 0, 6)(3) > 0  # step 4 on the 6-step curve, as computed
    # the same --steps resumes without a word (exact resume stays exact)
    same = train(*args(model_dir, data["pc"], tmp_path / "b", "--steps", "4", "--lr-schedule", "cosine",
                       "--save-steps", "2"))
    assert same.exit_code == 0
    import shutil

    shutil.rmtree(tmp_path / "b" / "final")
    resumed = train(*args(model_dir, data["pc"], tmp_path / "b", "--steps", "4", "--lr-schedule", "cosine",
                          "--resume"))
    assert resumed.exit_code == 0 and "warning: --resume" not in resumed.output


def test_the_docs_give_lema_demo_one_duration():
    phrase = "about a minute (50-80 s on a quiet 2-core CPU)"
    texts = {p: (ROOT / p).read_text(encoding="utf-8") for p in
             ("README.md", "docs/cli.md", "docs/user-guide.md", "lema/cli/demo_cmd.py")}
    for path, text in texts.items():
        assert " ".join(phrase.split()) in " ".join(text.split()), path
        for other in ("75-80 s", "two minutes", "~1 min", "1-2 min"):
            assert other not in text, (path, other)


def test_the_readme_says_which_torch_build_and_how_to_choose_and_keeps_the_quick_start():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 -e . && lema demo" in readme
    assert "pip install torch==2.13.0 -e '.[test]' && lint-imports" in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "gets a CPU build;" not in readme  # the old claim, true only where a CPU wheel is preferred
