"""``lema train`` on chat data: a tiny Llama folder with a real fast tokenizer and a Jinja
chat template learns a fixed answer to random-word questions (which it can only if the
questions are off the loss), with eval lines, TensorBoard events, every data form,
packing, --config YAML, the optimizers, and the tokenizer travelling through convert,
merge and generate --chat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lema.cli import main
from tests.chat_models import ANSWER, chat_llama_folder, write_chat_data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return chat_llama_folder(tmp_path_factory.mktemp("chatmodel") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_chat_data(tmp_path_factory.mktemp("chatdata"), n=40)


def run(*args: str) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--batch", "4", "--seq", "64",
            "--rank", "8", "--lr", "2e-2", "--device", "cpu", *extra]


def metrics(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, data) -> Path:
    out = tmp_path_factory.mktemp("run") / "chat"
    result = run(*train_args(model_dir, data["messages"], out, "--steps", "30", "--eval-split", "0.1",
                             "--eval-steps", "10", "--report-to", "tensorboard"))
    assert result.exit_code == 0, result.output
    return out


def test_messages_training_drives_the_loss_near_zero_with_eval_lines_and_tensorboard(trained):
    train, evals = metrics(trained)
    assert len(train) == 30 and train[0]["loss"] > 3.0
    assert train[-1]["loss"] < 0.05  # only possible with the random-word user turns off the loss
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval_loss"] < 0.1  # held-out questions are new random words: they are off the loss
    assert all(r["eval_perplexity"] >= 1.0 for r in evals)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (trained / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/loss", "eval/perplexity"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/loss")] == [10, 20, 30]


def test_the_trained_adapter_answers_through_generate_chat(trained, model_dir):
    result = run("generate", "--model", str(model_dir), "--adapter", str(trained / "final"), "--chat",
                 "--system", "you are a helpful assistant", "--prompt", "green paper rabbit", "--device", "cpu",
                 "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == ANSWER


@pytest.mark.parametrize("form", ["parquet", "sharegpt", "alpaca"])
def test_the_same_data_as_parquet_sharegpt_and_alpaca_trains_too(tmp_path, model_dir, data, form):
    out = tmp_path / "run"
    result = run(*train_args(model_dir, data[form], out, "--steps", "12"))
    assert result.exit_code == 0, result.output
    assert {"parquet": "messages,", "sharegpt": "sharegpt,", "alpaca": "alpaca,"}[form] in result.output
    train, _ = metrics(out)
    assert train[-1]["loss"] < train[0]["loss"] / 4


def test_packing_trains_and_reports_the_packing(tmp_path, model_dir, data):
    out = tmp_path / "run"
    result = run(*train_args(model_dir, data["messages"], out, "--steps", "12", "--packing", "--batch", "2"))
    assert result.exit_code == 0, result.output
    assert "packing: packed 40 examples into" in result.output
    train, _ = metrics(out)
    assert train[-1]["loss"] < train[0]["loss"] / 4
    assert max(r["tokens"] for r in train) > 2 * 26  # several conversations in one row


def test_config_yaml_gives_every_option_and_flags_override_it(tmp_path, model_dir, data):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"""model: {model_dir}
data: {data['messages']}
out: {out}
steps: 5
batch: 2
seq: 64
lr: 2.0e-2
rank: 4
targets: [q_proj, v_proj]
dropout: 0.1
weight-decay: 0.01
max_grad_norm: 0.5
optimizer: sgd
dtype: float32
eval-split: 0.1
save-steps: 1
save-total-limit: 2
device: cpu
""", encoding="utf-8")
    result = run("train", "--config", str(config), "--steps", "4")
    assert result.exit_code == 0, result.output
    train, evals = metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter["lora_dropout"] == 0.1
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["config"]["max_grad_norm"] == 0.5 and state["config"]["dtype"] == "float32"
    args = json.loads((out / "train_args.json").read_text())
    assert args["optimizer"] == "sgd" and args["weight_decay"] == 0.01 and args["steps"] == 4


def test_config_yaml_errors_are_one_line(tmp_path, model_dir, data):
    config = tmp_path / "bad.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data['messages']}\nout: {tmp_path / 'o'}\nlerning_rate: 1\n")
    result = run("train", "--config", str(config))
    assert result.exit_code == 2
    assert "Error: --config:" in result.output and "unknown option 'lerning_rate'" in result.output
    config.write_text("model: [unclosed\n")
    result = run("train", "--config", str(config))
    assert result.exit_code == 2 and "invalid YAML at line" in result.output


@pytest.mark.parametrize("extra", [("--optimizer", "adamw8bit"), ("--packing", "--eval-split", "0.1")],
                         ids=["adamw8bit", "packing"])
def test_adamw8bit_and_packing_resume_exactly(tmp_path, model_dir, data, extra):
    if "adamw8bit" in extra:
        pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    extra = ("--steps", "4", "--batch", "2", *extra)
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert run(*train_args(model_dir, data["messages"], straight, *extra)).exit_code == 0
    assert run(*train_args(model_dir, data["messages"], resumed, "--save-steps", "2", *extra)).exit_code == 0
    import shutil

    shutil.rmtree(resumed / "final")
    result = run(*train_args(model_dir, data["messages"], resumed, *extra, "--resume"))
    assert result.exit_code == 0, result.output
    a = load_file(str(straight / "final" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    train, _ = metrics(straight)
    assert train[-1]["loss"] < train[0]["loss"]


def test_wandb_offline_writes_a_run_under_out(tmp_path, model_dir, data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    result = run(*train_args(model_dir, data["messages"], out, "--steps", "2", "--report-to", "wandb"))
    assert result.exit_code == 0, result.output
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert any(run_dir.glob("*.wandb"))


def test_convert_then_train_needs_no_tokenizer_and_merge_writes_one(tmp_path, model_dir, data):
    from transformers import AutoTokenizer

    converted = tmp_path / "models" / "tiny.safetensors"
    assert run("convert", str(model_dir), str(converted), "--device", "cpu").exit_code == 0
    assert (tmp_path / "models" / "tiny.tokenizer" / "tokenizer.json").is_file()
    out = tmp_path / "run"
    result = run(*train_args(converted, data["messages"], out, "--steps", "2"))
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    result = run("merge", "--base", str(converted), "--adapter", str(out / "final"), "--out", str(merged),
                 "--hf-folder")
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template and tok("apple river")["input_ids"] == \
        AutoTokenizer.from_pretrained(model_dir)("apple river")["input_ids"]
    single = tmp_path / "merged.safetensors"
    assert run("merge", "--base", str(converted), "--adapter", str(out / "final"), "--out", str(single)).exit_code == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "merged.tokenizer").chat_template


@pytest.mark.parametrize("flag,module,extra", [(("--report-to", "tensorboard"), "tensorboard", "tensorboard"),
                                               (("--report-to", "wandb"), "wandb", "wandb"),
                                               (("--optimizer", "adamw8bit"), "bitsandbytes", "quant")])
def test_a_missing_optional_library_is_one_line_naming_the_extra(tmp_path, model_dir, data, monkeypatch, flag,
                                                                  module, extra):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    out = tmp_path / "run"
    result = run(*train_args(model_dir, data["messages"], out, "--steps", "1", *flag))
    assert result.exit_code == 2
    assert f"needs the optional package '{module}': pip install 'lema[{extra}]'" in result.output
    assert "Traceback" not in result.output and not out.exists()
