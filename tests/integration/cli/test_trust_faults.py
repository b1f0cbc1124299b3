"""Issue 25's faults, each as it was reported: what a run must never lose, the signals it
must survive, the modes its files get, and the hostile inputs whose cost must stay bounded.

(The refusals of single bad inputs are in the corpus: tests/hostile_corpus.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lema.app.training.run_folder import written_by_lema
from lema.errors import CheckpointError
from tests.demo_models import byte_tokenizer, copy_tree, tiny_llama_folder, write_data
from tests.integration.cli.test_train_safety import (
    adapter,
    args,
    error_line,
    run,
    snapshot,
)

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[3]
LEMA = "import sys; from lema.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))["text"]


def metrics_steps(out: Path) -> list[int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def start_training(model: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``lema train`` in a child process, returned once it has logged its first step."""
    child = subprocess.Popen([sys.executable, "-c", LEMA, *args(model, data, out, "--steps", "100000", *extra)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0]
        time.sleep(0.02)
    return child


# -- 1. a save after a failure never replaces a checkpoint ----------------------------------------

def test_a_resume_from_a_checkpoint_holding_nan_is_refused_and_every_checkpoint_kept(tmp_path, model_dir, data):
    out = tmp_path / "run"
    assert run(*args(model_dir, data, out, "--steps", "6", "--save-steps", "4")).exit_code == 0
    weights = out / "final" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    before = snapshot(out)
    result = run(*args(model_dir, data, out, "--steps", "8", "--resume"))
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert f"{weights}: tensor {key} holds NaN or infinite values" in line
    assert snapshot(out) == before  # checkpoint-4 above all


def test_a_save_after_a_failure_keeps_the_checkpoint_of_its_step_and_replaces_nothing(tmp_path, model_dir):
    from lema import LemaConfig, LemaModel

    config = LemaConfig(model_name_or_path=str(model_dir), lora_rank=4, device="cpu", max_seq_len=16)
    with LemaModel(config) as lema:
        lema.initialize_lora()
        trainer = lema.get_trainer(torch.optim.AdamW(lema.get_trainable_parameters(), lr=1e-2))
        trainer.train_step(torch.arange(1, 17)[None])
        ckpt = trainer.save_checkpoint(tmp_path / "checkpoint-1")
        before, inode = snapshot(ckpt), ckpt.stat().st_ino
        assert trainer.save_checkpoint(ckpt, keep_existing=True) == ckpt
        assert snapshot(ckpt) == before and ckpt.stat().st_ino == inode  # not rewritten
        trainer.train_step(torch.arange(2, 18)[None])
        with pytest.raises(CheckpointError, match="a checkpoint of another step; LEMA does not replace it"):
            trainer.save_checkpoint(ckpt, keep_existing=True)
        assert snapshot(ckpt) == before
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "notes.txt").write_text("keep me")
        with pytest.raises(CheckpointError, match="not a checkpoint LEMA wrote"):
            trainer.save_checkpoint(mine)
        assert (mine / "notes.txt").read_text() == "keep me"
        assert written_by_lema(trainer.save_checkpoint(tmp_path / "checkpoint-2"))


# -- 2. a second signal ------------------------------------------------------------------------------

DOUBLE_SIGNAL_EXTRA = ("--lora-dropout", "0.1", "--seed", "5", "--grad-accum", "2")


def double_signal_run(tmp_path: Path, model_dir: Path, data: Path, gap: float, signum: int = signal.SIGTERM
                      ) -> dict:
    """Stop a run with two signals ``gap`` seconds apart; resume it 2 steps further and train
    the same steps straight. Returns what the checks need."""
    out = tmp_path / "run"
    child = start_training(model_dir, data, out, *DOUBLE_SIGNAL_EXTRA)
    child.send_signal(signum)
    time.sleep(gap)
    child.send_signal(signum)
    output, _ = child.communicate(timeout=120)
    ckpts = sorted(out.glob("checkpoint-*"))
    result = {"code": child.returncode, "output": output, "checkpoints": [p.name for p in ckpts],
              "temps": [p.name for p in out.glob(".*tmp-*")], "lock": (out / ".lema.lock").exists()}
    if len(ckpts) != 1:
        return result
    step = int(ckpts[0].name.split("-")[1])
    result["step"] = step
    result["metrics_steps"] = metrics_steps(out)
    resumed = run(*args(model_dir, data, out, "--steps", str(step + 2), *DOUBLE_SIGNAL_EXTRA, "--resume"))
    straight = tmp_path / "straight"
    assert run(*args(model_dir, data, straight, "--steps", str(step + 2), *DOUBLE_SIGNAL_EXTRA)).exit_code == 0
    result["resumed_code"] = resumed.exit_code
    x, y = adapter(out / "final"), adapter(straight / "final")
    result["identical"] = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    result["same_losses"] = [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(r)["loss"] for r in (straight / "metrics.jsonl").read_text().splitlines()]
    return result


def assert_double_signal_held(result: dict, code: int = 143) -> None:
    assert result["code"] == code, result["output"]
    assert len(result["checkpoints"]) == 1 and result["temps"] == [] and not result["lock"], result
    assert result["metrics_steps"] == list(range(1, result["step"] + 1)), result
    assert result["resumed_code"] == 0 and result["identical"] and result["same_losses"], result


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.0, 0.05, 0.3])
def test_a_second_sigterm_still_exits_143_with_a_resumable_checkpoint_and_every_metrics_line(tmp_path, model_dir,
                                                                                             data, gap):
    assert_double_signal_held(double_signal_run(tmp_path, model_dir, data, gap))


@pytest.mark.slow
def test_a_double_ctrl_c_exits_130_with_every_metrics_line(tmp_path, model_dir, data):
    assert_double_signal_held(double_signal_run(tmp_path, model_dir, data, 0.05, signal.SIGINT), code=130)


# -- 3. pruning ----------------------------------------------------------------------------------------

def test_pruning_touches_only_checkpoints_lema_wrote(tmp_path, model_dir, data):
    out = tmp_path / "run"
    assert run(*args(model_dir, data, out, "--steps", "2", "--save-steps", "1")).exit_code == 0
    (out / "checkpoint-1000").mkdir()
    notes = out / "checkpoint-1000" / "notes.txt"
    notes.write_text("mine")
    (out / "checkpoint-0").write_text("a file of mine")
    result = run(*args(model_dir, data, out, "--steps", "6", "--save-steps", "1", "--save-total-limit", "2",
                       "--resume"))
    assert result.exit_code == 0, result.output
    assert notes.read_text() == "mine" and (out / "checkpoint-0").read_text() == "a file of mine"
    assert sorted(p.name for p in out.glob("checkpoint-*") if written_by_lema(p)) == ["checkpoint-4", "checkpoint-5"]
    # a save at a step where the user keeps a file: refused before the first step, the file kept
    (out / "checkpoint-7").write_text("also mine")
    before = snapshot(out)
    result = run(*args(model_dir, data, out, "--steps", "8", "--save-steps", "1", "--resume"))
    assert result.exit_code == 2 and "checkpoint-7, named like a checkpoint" in error_line(result)
    assert (out / "checkpoint-7").read_text() == "also mine" and snapshot(out) == before


# -- 4. a full disk during convert --------------------------------------------------------------------

def lema_with_file_limit(limit: int, *argv: str) -> subprocess.CompletedProcess:
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
            + LEMA)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


@pytest.mark.slow
def test_a_full_disk_during_convert_names_the_output_and_leaves_neither_file(tmp_path, model_dir):
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    inputs = snapshot(model_dir)
    done = lema_with_file_limit(16 * 1024, "convert", str(model_dir), str(out), "--device", "cpu")
    assert done.returncode == 2, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {out}: could not write it (File too large)"), lines
    assert sorted(p.name for p in out.parent.iterdir()) == [] and snapshot(model_dir) == inputs
    again = run("convert", str(model_dir), str(out), "--device", "cpu")  # no --overwrite needed
    assert again.exit_code == 0, again.output
    assert out.is_file() and (out.parent / "model.tokenizer" / "tokenizer.json").is_file()


# -- 5. modes ------------------------------------------------------------------------------------------

def modes(root: Path) -> dict[str, int]:
    found = {str(root): root.stat().st_mode & 0o777} if root.is_dir() else {}
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    found.update({str(p): p.stat().st_mode & 0o777 for p in paths if not p.is_symlink()})
    return found


def assert_umask_modes(roots: list[Path], umask: int) -> None:
    wrong = {p: oct(m) for root in roots for p, m in modes(root).items()
             if m != ((0o777 if Path(p).is_dir() else 0o666) & ~umask)}
    assert wrong == {}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_gets_the_mode_the_umask_gives(tmp_path, model_dir, data, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert run(*args(model_dir, data, out, "--steps", "2", "--save-steps", "1")).exit_code == 0
        converted = tmp_path / "c" / "model.safetensors"
        assert run("convert", str(model_dir), str(converted), "--device", "cpu").exit_code == 0
        merged = tmp_path / "m" / "merged.safetensors"
        assert run("merge", "--base", str(converted), "--adapter", str(out / "final"), "--out",
                   str(merged)).exit_code == 0
        folder = tmp_path / "mf"
        assert run("merge", "--base", str(converted), "--adapter", str(out / "final"), "--out", str(folder),
                   "--hf-folder").exit_code == 0
    finally:
        os.umask(old)
    assert_umask_modes([out, converted.parent, merged.parent, folder], umask)


@pytest.mark.slow
def test_demo_and_bench_outputs_get_the_mode_the_umask_gives(tmp_path, model_dir):
    old = os.umask(0o022)
    try:
        demo = run("demo", "--size", "tiny", "--steps", "2", "--out", str(tmp_path / "demo"))
        assert demo.exit_code == 0, demo.output
        bench = run("bench", "--model", str(model_dir), "--no-reference", "--steps", "1", "--warmup", "0",
                    "--batch", "1", "--seq", "8", "--workdir", str(tmp_path / "bench"))
        assert bench.exit_code == 0, bench.output
    finally:
        os.umask(old)
    assert_umask_modes([tmp_path / "demo", tmp_path / "bench"], 0o022)


# -- 6. a header's 60 MB metadata string --------------------------------------------------------------

def peak_of(*argv: str) -> tuple[int, float, int, str]:
    """``lema argv`` in a fresh process: exit status, seconds, peak RSS (bytes), stderr.

    The peak is ``VmHWM`` (this process's own memory), not ``ru_maxrss``, which Linux carries
    over from the parent across ``exec`` (the test process's size would count)."""
    code = ("import sys, time\nfrom lema.cli import main\nt = time.perf_counter()\nc = 0\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    c = e.code\n"
            "hwm = next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1]\n"
            "print('COST', c or 0, time.perf_counter() - t, hwm, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=300)
    cost = next(x for x in done.stderr.splitlines() if x.startswith("COST")).split()
    return int(cost[1]), float(cost[2]), int(cost[3]) * 1024, done.stderr


@pytest.mark.slow
def test_a_60_mb_metadata_string_is_read_in_bounded_time_and_memory(tmp_path, model_dir, data):
    folder = copy_tree(model_dir, tmp_path / "model")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "note": "x" * 60_000_000})
    for argv in (("plan", "--model", str(folder)),
                 tuple(args(folder, data, tmp_path / "run", "--steps", "1"))):
        code, seconds, rss, stderr = peak_of(*argv)
        assert code == 0 and seconds < 10 and rss < 1 << 30, (argv[0], code, seconds, rss, stderr[-2000:])


# -- 9. progress while a large data set is read --------------------------------------------------------

def test_a_large_data_set_says_how_far_checking_and_tokenizing_have_got(tmp_path):
    from lema.data.loading import DataOptions, load_data

    text = tmp_path / "big.txt"
    text.write_text("\n\n".join(f"paragraph {i} " + "words " * 50 for i in range(400)), encoding="utf-8")
    lines: list[str] = []
    load_data(str(text), byte_tokenizer(), DataOptions(seq=64, progress=lines.append, progress_every=0.0))
    assert any(x.strip().startswith(f"checking {text}:") and "so far" in x for x in lines), lines[:3]
    assert any(x.strip().startswith(f"tokenizing {text}:") and "so far" in x for x in lines), lines[:3]


# -- 13. a model file truncated under a run --------------------------------------------------------------

@pytest.mark.slow
def test_truncating_the_model_file_under_a_run_is_named_not_a_sigbus(tmp_path, model_dir, data):
    model = copy_tree(model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    out = tmp_path / "run"
    child = start_training(model, data, out)
    cut = threading.Thread(target=os.truncate, args=(weights, weights.stat().st_size // 2))
    cut.start()  # held back by the run's lease until it has stopped
    output, _ = child.communicate(timeout=120)
    cut.join(timeout=120)
    assert child.returncode == 2, output
    errors = [x for x in output.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and f"{weights}: another process is truncating or rewriting the file" in errors[0]
    assert "Traceback" not in output and not (out / ".lema.lock").exists()


# -- 15. generate on a .bin folder -------------------------------------------------------------------------

def test_generate_reads_a_bin_only_folder_as_train_does(tmp_path):
    folder = tiny_llama_folder(tmp_path / "bin", weights="bin")
    result = run("generate", "--model", str(folder), "--prompt", "hello", "--device", "cpu", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "gbi_path" not in result.output and result.stdout.startswith("hello")


def test_the_cli_never_tells_a_user_about_gbi_path(tmp_path):
    folder = tmp_path / "empty_model"
    folder.mkdir()
    tokenizer = tiny_llama_folder(tmp_path / "m")
    (folder / "config.json").write_text((tokenizer / "config.json").read_text())
    result = run("generate", "--model", str(folder), "--tokenizer", str(tokenizer), "--prompt", "hello",
                 "--device", "cpu")
    assert result.exit_code == 2 and "lema convert" in error_line(result) and "gbi_path" not in result.output


# -- 11. --seq beyond the context -------------------------------------------------------------------------

def test_a_seq_beyond_a_rotary_models_context_runs_with_a_warning_that_says_so(tmp_path, model_dir, data):
    result = run(*args(model_dir, data, tmp_path / "run", "--steps", "1", "--seq", "1024"))
    assert result.exit_code == 0, result.output
    warned = [x for x in result.stderr.splitlines() if x.startswith("warning: --seq 1,024 is longer than the model's "
                                                                       "context (512 positions")]
    assert len(warned) == 1
