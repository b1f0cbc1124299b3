"""The field's names: TRL / transformers / axolotl YAML files and HF option spellings train
through ``lema train`` to the same adapter as LEMA's own flags; their data mappings
(``dialog/speaker/text`` rows), ``--train-on-inputs``, roles to train and mixed data sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lema.cli import main
from tests.chat_models import chat_llama_folder, chat_tokenizer, conversations

pytest.importorskip("transformers")


def train(*args: str):
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    # the same options run the same ops in the same order: bit-identical (docs/testing.md)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def flags_run(tmp_path_factory, model_dir, data) -> Path:
    out = tmp_path_factory.mktemp("flags") / "run"
    result = train("--model", str(model_dir), "--data", str(data["pc"]), "--out", str(out), "--steps", "3",
                   "--batch", "2", "--seq", "48", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--device", "cpu",
                   "--lr-schedule", "cosine", "--warmup", "1", "--seed", "0")
    assert result.exit_code == 0, result.output
    return out


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_trl_sft_config_trains_to_the_same_adapter_as_the_flags(tmp_path, model_dir, data, flags_run):
    # the shape of TRL's examples/cli_configs (ModelConfig + ScriptArguments + SFTConfig in one file)
    config = write(tmp_path / "sft.yaml", f"""
model_name_or_path: {model_dir}
dataset_name: {data["pc"]}
output_dir: {tmp_path / "run"}
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
learning_rate: 1.0e-2
max_steps: 3
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
gradient_checkpointing: true
max_length: 48
lr_scheduler_type: cosine
warmup_steps: 1
logging_steps: 1
report_to: none
bf16: false
completion_only_loss: true
seed: 0
""")
    result = train("--config", str(config), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert same(adapter(tmp_path / "run"), adapter(flags_run))


def test_an_hf_training_arguments_config_and_the_hf_flag_spellings_give_the_same_adapter(
        tmp_path, model_dir, data, flags_run):
    config = write(tmp_path / "args.yaml", f"""
output_dir: {tmp_path / "run"}
overwrite_output_dir: false
do_train: true
num_train_epochs: 3.0
max_steps: 3
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 0.01
weight_decay: 0.0
max_grad_norm: 1.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
optim: adamw_torch
logging_steps: 1
logging_dir: ./logs
per_device_eval_batch_size: 8
save_strategy: steps
save_steps: 0
eval_strategy: "no"
report_to: []
seed: 0
fp16: false
""")
    result = train("--config", str(config), "--model", str(model_dir), "--data", str(data["pc"]), "--seq", "48",
                   "--rank", "4", "--alpha", "8", "--device", "cpu")
    # num_train_epochs and max_steps together: transformers lets max_steps win; LEMA refuses the pair
    assert result.exit_code == 2 and "--steps or --epochs" in result.output
    config.write_text(config.read_text().replace("num_train_epochs: 3.0\n", ""))
    result = train("--config", str(config), "--model", str(model_dir), "--data", str(data["pc"]), "--seq", "48",
                   "--rank", "4", "--alpha", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert same(adapter(tmp_path / "run"), adapter(flags_run))  # warmup_ratio 0.1 of 3 steps: 1 step
    assert "note: --config: " in result.output and "per_device_eval_batch_size: LEMA evaluates with --batch" \
        in result.output
    # the HF spellings on the command line
    result = train("--model-name-or-path", str(model_dir), "--dataset-name", str(data["pc"]),
                   "--output-dir", str(tmp_path / "cli"), "--max-steps", "3", "--per-device-train-batch-size", "2",
                   "--max-length", "48", "--lora-r", "4", "--lora-alpha", "8", "--learning-rate", "1e-2",
                   "--lr-scheduler-type", "cosine", "--warmup-ratio", "0.1", "--gradient-accumulation-steps", "1",
                   "--optim", "adamw_torch", "--logging-steps", "1", "--report-to", "none", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert same(adapter(tmp_path / "cli"), adapter(flags_run))


def test_an_axolotl_config_with_mapped_chat_fields_trains_to_the_same_adapter_as_the_flags(tmp_path):
    model = chat_llama_folder(tmp_path / "chat")
    rows = [{"dialog": [{"speaker": {"user": "human", "assistant": "bot", "system": "system"}[m["role"]],
                         "text": m["content"]} for m in conv]} for conv in conversations(12)]
    dialog = write(tmp_path / "dialog.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    config = write(tmp_path / "axolotl.yml", f"""
base_model: {model}
model_type: AutoModelForCausalLM
load_in_8bit: false
load_in_4bit: false
strict: false

datasets:
  - path: {dialog}
    type: chat_template
    field_messages: dialog
    message_property_mappings:
      role: speaker
      content: text
    roles:
      user: ["human"]
      assistant: ["bot"]
      system: ["system"]
    roles_to_train: ["assistant"]
dataset_prepared_path:
val_set_size: 0
output_dir: {tmp_path / "axolotl-run"}

sequence_len: 64
sample_packing: false
pad_to_sequence_len: false

adapter: lora
lora_model_dir:
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_linear: true

wandb_project:
wandb_entity:

gradient_accumulation_steps: 1
micro_batch_size: 2
max_steps: 3
optimizer: adamw_torch
lr_scheduler: cosine
learning_rate: 0.01
train_on_inputs: false
bf16: false
tf32: false
gradient_checkpointing: true
flash_attention: false
warmup_steps: 1
logging_steps: 1
saves_per_epoch:
weight_decay: 0.0
deepspeed:
fsdp:
special_tokens:
""")
    result = train("--config", str(config), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "messages, 12 examples" in result.output
    flags = tmp_path / "flags-run"
    result = train("--model", str(model), "--data", str(dialog), "--out", str(flags), "--messages-field", "dialog",
                   "--role-key", "speaker", "--content-key", "text", "--roles", "human=user,bot=assistant",
                   "--seq", "64", "--rank", "4", "--alpha", "8", "--targets", "all-linear", "--batch", "2",
                   "--steps", "3", "--lr-schedule", "cosine", "--lr", "0.01", "--warmup", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert same(adapter(tmp_path / "axolotl-run"), adapter(flags))
    # without the mapping the rows name no format, and the message does not offer --format when it was given
    bare = train("--model", str(model), "--data", str(dialog), "--out", str(tmp_path / "bare"), "--format",
                 "messages", "--device", "cpu", "--steps", "1")
    assert bare.exit_code == 2 and 'missing field "messages"' in bare.output
    assert "choose the format with --format" not in bare.output
    assert "--messages-field" in bare.output


@pytest.mark.parametrize("text, expected", [
    ("learning_rat: 0.01\n", "did you mean 'learning_rate'"),
    ("lora_rnk: 4\n", "did you mean 'lora_r'"),
    ("gradient_acumulation_steps: 2\n", "did you mean 'gradient_accumulation_steps'"),
    ("stepz: 3\n", "did you mean 'steps'"),
])
def test_an_unknown_key_gets_a_suggestion(tmp_path, text, expected):
    config = write(tmp_path / "c.yaml", "output_dir: out\nper_device_train_batch_size: 2\n" + text)
    result = train("--config", str(config), "--model", "m", "--data", "d")
    assert result.exit_code == 2 and expected in result.output, result.output


@pytest.mark.parametrize("text, reason", [
    ("deepspeed: ds_config.json\n", "DeepSpeed"),
    ("fsdp: full_shard\n", "FSDP"),
    ("push_to_hub: true\n", "does not upload"),
    ("env:\n  CUDA_VISIBLE_DEVICES: 0\n", "environment variables"),  # TRL's example_config.yaml
    ("adapter: qlora\n", "--quantize nf4"),
    ("load_in_4bit: true\n", "--quantize nf4"),
    ("gradient_checkpointing: false\n", "always checkpoints"),
])
def test_keys_without_a_lema_meaning_are_refused_by_name_with_the_reason(tmp_path, text, reason):
    head = "base_model: m\nmicro_batch_size: 2\n" if "adapter" in text or "load_in" in text else \
        "output_dir: out\nlearning_rate: 0.1\n"
    config = write(tmp_path / "c.yaml", head + text)
    result = train("--config", str(config), "--model", "m", "--data", "d", "--out", "o")
    key = text.split(":")[0]
    assert result.exit_code == 2 and key in result.output and reason in result.output, result.output


def test_config_format_overrides_the_detection(tmp_path):
    # `wandb_project` means nothing to a LEMA file; read as axolotl, it is the W&B project
    config = write(tmp_path / "c.yaml", "wandb_project: p\nsteps: 1\n")
    lema = train("--config", str(config), "--config-format", "lema", "--model", "m", "--data", "d", "--out", "o")
    assert lema.exit_code == 2 and "'wandb_project'" in lema.output
    axolotl = train("--config-format", "axolotl", "--config", str(config), "--model", "m", "--data", "d",
                    "--out", "o")
    assert "'wandb_project'" not in axolotl.output


# -- data mapping ---------------------------------------------------------------------------


def test_train_on_inputs_and_roles_to_train_change_which_tokens_carry_the_loss(tmp_path):
    from lema.data.field_map import FieldMap
    from lema.data.loading import DataOptions, load_data

    tok = chat_tokenizer()
    convs = conversations(6)
    path = write(tmp_path / "d.jsonl", "".join(json.dumps({"dialog": [{"speaker": m["role"], "text": m["content"]}
                                                                     for m in c]}) + "\n" for c in convs))
    fields = FieldMap(messages="dialog", role="speaker", content="text")
    assistant = load_data(path, tok, DataOptions(seq=128, fields=fields)).store
    everything = load_data(path, tok, DataOptions(seq=128, fields=fields, train_on_inputs=True)).store
    with_user = load_data(path, tok, DataOptions(seq=128, fields=fields, roles_to_train=("user", "assistant"))).store
    assert everything.n_tokens == assistant.n_tokens == with_user.n_tokens
    assert everything.n_target_tokens == everything.n_tokens  # every token carries the loss
    assert assistant.n_target_tokens < with_user.n_target_tokens < everything.n_tokens
    # the assistant tokens counted by rendering: the answer and its end-of-turn, in each conversation
    user_tokens = sum(len(tok(c[1]["content"], add_special_tokens=False)["input_ids"]) for c in convs)
    assert with_user.n_target_tokens - assistant.n_target_tokens >= user_tokens
    # prompt/completion: train_on_inputs puts the loss on the prompt too
    pc = write(tmp_path / "pc.jsonl", "".join(json.dumps({"q": f"say {i}", "a": f" {i}"}) + "\n" for i in range(5)))
    pc_fields = FieldMap(prompt="q", completion="a")
    only = load_data(pc, tok, DataOptions(seq=64, fields=pc_fields)).store
    full = load_data(pc, tok, DataOptions(seq=64, fields=pc_fields, train_on_inputs=True)).store
    assert full.n_target_tokens == full.n_tokens > only.n_target_tokens > 0


def test_two_data_sets_mix_in_the_stated_proportions(tmp_path, model_dir, data):
    from lema.data.mixing import mix
    from lema.data.store import StoreBuilder

    def store(token: int, n: int):
        b = StoreBuilder()
        for i in range(n):
            b.add([token, token, i + 10], [1, 1, 1])
        return b.build({"format": "text", "seq": 8})

    a, b = store(1, 30), store(2, 10)
    mixed = mix([a, b], (0.75, 0.25), seed=0)
    origins = [int(mixed.arrays(i)[0][0]) for i in range(len(mixed))]
    assert len(mixed) == 40 and origins.count(1) == 30 and origins.count(2) == 10
    mixed = mix([a, b], (0.25, 0.75), seed=0)  # b repeated (3 x 10), a subsampled (10 of 30)
    origins = [int(mixed.arrays(i)[0][0]) for i in range(len(mixed))]
    assert origins.count(1) == 10 and origins.count(2) == 30
    assert len({int(mixed.arrays(i)[0][2]) for i in range(len(mixed)) if origins[i] == 2}) == 10
    mixed = mix([a, b], None, seed=0, epochs=(0.5, 2))  # passes over each: a seeded half of a, b twice
    origins = [int(mixed.arrays(i)[0][0]) for i in range(len(mixed))]
    assert origins.count(1) == 15 and origins.count(2) == 20
    # through the command: two --data and --data-weights
    out = tmp_path / "run"
    result = train("--model", str(model_dir), "--data", str(data["pc"]), "--data", str(data["text"]),
                   "--data-weights", "0.5,0.5", "--out", str(out), "--steps", "1", "--batch", "2", "--seq", "48",
                   "--rank", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"mix: 10 of {data['pc']}, 10 of {data['text']} (--data-weights 0.5,0.5)" in result.output
    result = train("--model", str(model_dir), "--data", str(data["pc"]), "--data", str(data["text"]),
                   "--data-epochs", "2,1", "--out", str(tmp_path / "epochs"), "--steps", "1", "--batch", "2",
                   "--seq", "48", "--rank", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"mix: 24 of {data['pc']}, 8 of {data['text']} (--data-epochs 2,1)" in result.output


# axolotl's examples/llama-3/lora-1b.yml, as that project ships it (abridged target list)
AXOLOTL_LORA_1B = """
base_model: NousResearch/Llama-3.2-1B

load_in_8bit: false
load_in_4bit: false
strict: false

datasets:
  - path: teknium/GPT4-LLM-Cleaned
    type: alpaca
dataset_prepared_path: last_run_prepared
val_set_size: 0.1
output_dir: ./outputs/lora-out

adapter: lora
lora_model_dir:

sequence_len: 2048
sample_packing: true
eval_sample_packing: true
pad_to_sequence_len: true

lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_fan_in_fan_out:
lora_target_modules:
  - gate_proj
  - down_proj

wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_8bit
lr_scheduler: cosine
learning_rate: 0.0002

train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true

loss_watchdog_threshold: 5.0
loss_watchdog_patience: 3

warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: "<|end_of_text|>"
"""


def test_axolotls_own_lora_example_maps_key_by_key(tmp_path):
    from lema.cli.config_file import read_yaml, to_default_map
    from lema.cli.field_names import detect, translate
    from lema.cli.train_cmd import train as command

    data = read_yaml(str(write(tmp_path / "lora-1b.yml", AXOLOTL_LORA_1B)))
    assert detect(data) == "axolotl"
    notes: list[str] = []
    mapped = to_default_map(command, translate(data, "axolotl", "lora-1b.yml", notes), "lora-1b.yml", fmt="axolotl")
    assert mapped == {
        "model_path": "NousResearch/Llama-3.2-1B", "data": ["teknium/GPT4-LLM-Cleaned"], "data_format": "alpaca",
        "eval_split": 0.1, "out": "./outputs/lora-out", "seq": 2048, "packing": True, "rank": 16, "alpha": 32,
        "lora_dropout": 0.05, "targets": "gate_proj,down_proj", "grad_accum": 2, "batch": 2, "epochs": 1,
        "optimizer": "adamw_8bit", "lr_schedule": "cosine", "lr": 0.0002, "train_on_inputs": False, "dtype": "auto",
        "logging_steps": 1, "warmup": 10, "evals_per_epoch": 4, "saves_per_epoch": 1, "weight_decay": 0.0}
    # the keys LEMA accepts without effect are said, one note each
    assert [n.split(": ")[2] for n in notes] == ["dataset_prepared_path", "eval_sample_packing",
                                                "loss_watchdog_threshold", "loss_watchdog_patience", "special_tokens"]
    # its 8-bit sibling (instruct-lora-8b.yml) is refused by the key that has no LEMA meaning, with the way out
    eight = write(tmp_path / "lora-8b.yml", AXOLOTL_LORA_1B.replace("load_in_8bit: false", "load_in_8bit: true"))
    result = train("--config", str(eight))
    assert result.exit_code == 2 and "load_in_8bit" in result.output and "--quantize int8" in result.output


def test_evals_and_saves_per_epoch_space_the_steps():
    from lema.app.training.run_training import _per_epoch

    assert _per_epoch(0, 4, 100) == 25 and _per_epoch(0, 4, 3) == 1 and _per_epoch(7, None, 100) == 7
    result = train("--model", __file__, "--data", "d", "--out", "o", "--eval-steps", "5", "--evals-per-epoch", "2")
    assert result.exit_code == 2 and "--evals-per-epoch or --eval-steps, not both" in result.output


def test_preference_keys_of_axolotl_and_trl_map_to_the_method_options():
    from lema.cli.field_names import translate
    from lema.errors import ConfigError

    axolotl = translate({"base_model": "m", "rl": "dpo", "rl_beta": 0.2, "lora_model_dir": "sft/final"},
                        "axolotl", "c.yaml")
    assert (axolotl["method"], axolotl["beta"], axolotl["adapter"]) == ("dpo", 0.2, "sft/final")
    assert translate({"loss_type": "ipo", "beta": 0.5}, "trl", "c.yaml") == {"method": "ipo", "beta": 0.5}
    assert translate({"loss_type": ["sigmoid"]}, "trl", "c.yaml") == {"method": "dpo"}
    for fmt, data in (("axolotl", {"rl": "grpo"}), ("trl", {"loss_type": "hinge"})):
        with pytest.raises(ConfigError, match="--method"):
            translate(data, fmt, "c.yaml")
