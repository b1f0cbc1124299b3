"""No command writes into or over its inputs, and an existing output is replaced only on
request: convert, merge, demo and bench refuse with one ``Error:`` line and exit 2, and
every file is byte-identical afterwards. A killed write leaves nothing on the next start."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lema import LemaConfig, LemaModel
from lema.app.tools.convert import prepare_monolithic_safetensors
from lema.cli import main
from lema.errors import OutputError
from tests.demo_models import tiny_llama_folder

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[3]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 of its bytes (symlinks by their target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """``root/hf`` (a transformers folder), ``root/model.safetensors`` (converted) and
    ``root/adapter`` (a LEMA checkpoint with non-zero adapters)."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_llama_folder(root / "hf")
    prepare_monolithic_safetensors(root / "hf", root / "model.safetensors", device="cpu")
    with LemaModel(LemaConfig(gbi_path=str(root / "model.safetensors"), device="cpu", lora_rank=2,
                              max_seq_len=8)) as model:
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
        trainer.train_step(torch.arange(16).view(2, 8))
        trainer.save_checkpoint(root / "adapter")
    return root


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_refused(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


# -- convert -----------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["hf/model.safetensors", "hf/lema.safetensors", "hf/sub/x.safetensors"])
def test_convert_never_writes_into_the_model_folder(inputs, target):
    before = snapshot(inputs)
    assert_refused(cli("convert", inputs / "hf", inputs / target, "--overwrite"), "input folder")
    assert snapshot(inputs) == before


def test_convert_onto_an_input_through_a_symlink_is_refused(inputs, tmp_path):
    link = tmp_path / "out.safetensors"
    link.symlink_to(inputs / "hf" / "model.safetensors")
    before = snapshot(inputs)
    assert_refused(cli("convert", inputs / "hf", link, "--overwrite"), "input")
    assert snapshot(inputs) == before and link.is_symlink()


def test_convert_refuses_an_existing_output_unless_overwrite(inputs, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert_refused(cli("convert", inputs / "hf", out), "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    assert cli("convert", inputs / "hf", out, "--overwrite").exit_code == 0
    assert out.read_bytes() == (inputs / "model.safetensors").read_bytes()
    (tmp_path / "empty.safetensors").touch()  # an empty file holds nothing to lose
    assert cli("convert", inputs / "hf", tmp_path / "empty.safetensors").exit_code == 0


def test_the_python_api_protects_inputs_too(inputs, tmp_path):
    before = snapshot(inputs)
    with pytest.raises(OutputError, match="input folder"):
        prepare_monolithic_safetensors(inputs / "hf", inputs / "hf" / "model.safetensors", device="cpu")
    from lema.app.tools.merge import merge_adapter

    with pytest.raises(OutputError, match="is the input file"):
        merge_adapter(inputs / "model.safetensors", inputs / "adapter", inputs / "model.safetensors", overwrite=True)
    out = tmp_path / "merged.safetensors"
    merge_adapter(inputs / "model.safetensors", inputs / "adapter", out)
    with pytest.raises(OutputError, match="already exists"):
        merge_adapter(inputs / "model.safetensors", inputs / "adapter", out)
    assert snapshot(inputs) == before


def test_save_checkpoint_never_replaces_what_the_model_reads(inputs, tmp_path):
    before = snapshot(inputs)
    with LemaModel(LemaConfig(model_name_or_path=str(inputs / "hf"), device="cpu", lora_rank=2)) as model:
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
        for path, needle in [(inputs / "hf", "is the input folder"), (inputs, "contains the input"),
                             (inputs / "hf" / "model.safetensors", "is the input file")]:
            with pytest.raises(OutputError, match=needle):
                trainer.save_checkpoint(path)
        trainer.save_checkpoint(tmp_path / "ckpt")  # anywhere else is fine
    assert snapshot(inputs) == before


_KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from lema.adapters.checkpoints.atomic import atomic_file
    with atomic_file({target!r}) as f:
        f.write(b"x" * 100000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_write_leaves_nothing_after_the_next_start(inputs, tmp_path):
    target = tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITE.format(repo=str(REPO), target=str(target))],
                          capture_output=True, cwd=REPO)
    assert done.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".model.safetensors.tmp-*")
    assert stale.stat().st_size == 100000 and not target.exists()
    # A live writer's temporary file (this process's pid) is not touched.
    live = tmp_path / f".model.safetensors.tmp-{os.getpid()}-abc123"
    live.write_bytes(b"in progress")
    assert cli("convert", inputs / "hf", target).exit_code == 0
    assert not stale.exists() and live.exists()
    assert target.read_bytes() == (inputs / "model.safetensors").read_bytes()


# -- merge -------------------------------------------------------------------------------------

@pytest.mark.parametrize("base,out,extra,needle", [
    ("hf", "hf", ["--hf-folder", "--overwrite"], "is the input folder"),
    ("hf", "hf/merged.safetensors", [], "inside the input folder"),
    ("hf", "hf/sub/merged", ["--hf-folder"], "inside the input folder"),
    ("model.safetensors", "model.safetensors", ["--overwrite"], "is the input file"),
    ("model.safetensors", "adapter", ["--hf-folder", "--overwrite"], "is the input folder"),
    ("hf", "adapter/merged.safetensors", [], "inside the input folder"),
    ("hf", "adapter/adapter_model.safetensors", ["--overwrite"], "inside the input folder"),
    ("model.safetensors", "", ["--hf-folder", "--overwrite"], "contains the input"),
])
def test_merge_never_writes_over_or_into_its_inputs(inputs, base, out, extra, needle):
    before = snapshot(inputs)
    result = cli("merge", "--base", inputs / base, "--adapter", inputs / "adapter", "--out", inputs / out, *extra)
    assert_refused(result, needle)
    assert snapshot(inputs) == before


def test_merge_refuses_an_existing_output_unless_overwrite(inputs, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["merge", "--base", inputs / "hf", "--adapter", inputs / "adapter", "--out", out, "--hf-folder"]
    assert_refused(cli(*args), "already exists", "--overwrite")
    assert snapshot(tmp_path) == {"merged/notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert cli(*args, "--overwrite").exit_code == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


# -- demo and bench ----------------------------------------------------------------------------

def test_demo_refuses_a_non_empty_out_unless_overwrite(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    assert_refused(cli("demo", "--out", tmp_path, "--size", "tiny", "--steps", "1"), "not empty", "--overwrite")
    assert snapshot(tmp_path) == {"mine.txt": hashlib.sha256(b"keep me").hexdigest()}


def test_bench_refuses_an_existing_result_and_a_workdir_inside_its_model(inputs, tmp_path):
    (tmp_path / "bench.json").write_text("{}")
    assert_refused(cli("bench", "--preset", "tiny", "--workdir", tmp_path), "bench.json", "--overwrite")
    assert (tmp_path / "bench.json").read_text() == "{}"
    before = snapshot(inputs)
    assert_refused(cli("bench", "--model", inputs / "hf", "--workdir", inputs / "hf" / "w"), "input folder")
    assert snapshot(inputs) == before
