"""The field's config files as ``lema train --config``: TRL / transformers ``TrainingArguments`` and axolotl.

Most keys of those files are also option names of ``lema train`` (``learning_rate`` is
``--learning-rate``, an alias of ``--lr``; :mod:`lema.cli.train_options`). This module turns
the rest into LEMA's options: the keys whose values need translating (``bf16: true`` is
``dtype: bfloat16``, a float ``num_train_epochs``, axolotl's ``datasets`` list), the keys
that only agree with what LEMA always does (``gradient_checkpointing: true``), and refuses by
name, with the reason, every key that has no meaning in a LEMA run (``deepspeed``,
``fsdp``, ...).

The format is detected from the keys (:func:`detect`) or named with ``--config-format``.
"""

from __future__ import annotations

from typing import Any, Callable

from lema.cli.preference_names import AXOLOTL_PREFERENCE, TRL_PREFERENCE
from lema.errors import ConfigError

FORMATS = ("auto", "lema", "hf", "trl", "axolotl")

# Keys only one format has: how a file is recognised.
AXOLOTL_KEYS = frozenset({"base_model", "datasets", "sequence_len", "micro_batch_size", "num_epochs", "adapter",
                          "sample_packing", "val_set_size", "lora_target_linear", "load_in_4bit", "load_in_8bit",
                          "wandb_project", "lr_scheduler"})
HF_KEYS = frozenset({"learning_rate", "num_train_epochs", "per_device_train_batch_size", "output_dir",
                     "gradient_accumulation_steps", "model_name_or_path", "max_length", "max_seq_length",
                     "lr_scheduler_type", "warmup_ratio", "logging_steps", "optim", "dataset_name",
                     "dataset_text_field", "completion_only_loss", "assistant_only_loss", "use_peft"})

_DISTRIBUTED = ("LEMA trains one device per process and runs data parallel under torchrun "
                "(docs/distributed.md); it does not shard with {}")
_HUB = "LEMA does not upload; push DIR/final with huggingface-cli upload"
_KERNEL = "LEMA picks its attention and kernels itself (PyTorch SDPA)"

# Keys with no meaning in a LEMA run, and why (refused whatever their value).
REFUSED: dict[str, str] = {
    "deepspeed": _DISTRIBUTED.format("DeepSpeed"),
    "fsdp": _DISTRIBUTED.format("FSDP"),
    "fsdp_config": _DISTRIBUTED.format("FSDP"),
    "ddp_find_unused_parameters": "LEMA's data parallel is its own (torchrun), not DDP's",
    "local_rank": "torchrun sets the rank; LEMA reads it from the environment",
    "push_to_hub": _HUB, "hub_model_id": _HUB, "hub_strategy": _HUB, "hub_token": _HUB,
    "torch_compile": "LEMA streams layers through fixed slots; torch.compile is not used",
    "use_liger_kernel": _KERNEL, "liger_kernel": _KERNEL,
    "unsloth_lora_mlp": _KERNEL,
    "gradient_checkpointing_kwargs": "LEMA checkpoints every layer's input itself; there is nothing to configure",
    "tokens": "LEMA does not add tokens to the vocabulary (it would need a trained embedding)",
    "early_stopping_patience": "LEMA has no early stopping; watch eval_loss in metrics.jsonl and stop the run "
                               "(Ctrl-C saves a checkpoint)",
    "group_by_length": "LEMA orders batches by a seeded shuffle (packing fills the rows instead)",
    "peft_use_dora": "LEMA trains plain LoRA adapters", "use_dora": "LEMA trains plain LoRA adapters",
    "use_rslora": "LEMA trains plain LoRA adapters (alpha / rank scaling)",
    "peft_use_rslora": "LEMA trains plain LoRA adapters (alpha / rank scaling)",
    "lora_modules_to_save": "LEMA trains only the LoRA adapters; the base weights stay frozen",
    "modules_to_save": "LEMA trains only the LoRA adapters; the base weights stay frozen",
    "wandb_entity": "set WANDB_ENTITY in the environment; --report-to wandb logs to it",
    "wandb_watch": "LEMA logs the run's metrics to wandb, not the model's gradients",
    "wandb_log_model": "LEMA does not upload checkpoints to wandb",
    "trust_remote_code": "LEMA never runs a model's own code",
    "env": "set environment variables in the shell that runs lema train",
    "eval_max_new_tokens": "LEMA's evaluation is the held-out loss; sample with lema generate",
    "eval_table_size": "LEMA's evaluation is the held-out loss; sample with lema generate",
    "eval_causal_lm_metrics": "LEMA's evaluation is the held-out loss and perplexity",
    "model_revision": "LEMA reads a local model (convert it with lema convert)",
    "label_smoothing_factor": "LEMA's loss is the plain next-token cross-entropy",
    "neftune_noise_alpha": "LEMA does not add noise to the embeddings",
}


Rule = Callable[[Any, str], dict[str, Any]]
NOTE = "__note__"  # a rule's output key for a line said to the user instead of an option


def _same(name: str) -> Rule:
    return lambda value, where: {name: value}


def _whole(name: str, what: str) -> Rule:
    def rule(value: Any, where: str) -> dict[str, Any]:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {value!r} must be a whole number of {what} (LEMA counts whole {what})")
        return {name: value}
    return rule


def _max_steps(value: Any, where: str) -> dict[str, Any]:
    if value == -1:  # transformers' "no limit": the epochs decide
        return {}
    return _whole("steps", "steps")(value, where)


def _precision(dtype: str) -> Rule:
    def rule(value: Any, where: str) -> dict[str, Any]:
        if value is False or value is None:
            return {}
        if value is True:
            return {"dtype": dtype}
        if value == "auto":
            return {"dtype": "auto"}
        raise ConfigError(f"{where}: {value!r} must be true, false or auto")
    return rule


def _agree(expected: Any, reason: str) -> Rule:
    """A key that only agrees with what LEMA always does: accepted at that value, refused otherwise."""
    def rule(value: Any, where: str) -> dict[str, Any]:
        if value == expected or (isinstance(expected, tuple) and value in expected):
            return {}
        raise ConfigError(f"{where}: {value!r} is not supported: {reason}")
    return rule


def _note(text: str) -> Rule:
    """A key LEMA reads but does not need: accepted, with a note saying what LEMA does instead."""
    return lambda value, where: {NOTE: f"{where}: {text}"}


def _class_name(suffix: str, reason: str) -> Rule:
    def rule(value: Any, where: str) -> dict[str, Any]:
        if isinstance(value, str) and value.endswith((suffix, suffix + "Fast")) and value.isidentifier():
            return {}
        raise ConfigError(f"{where}: {value!r} is not supported: {reason} (a class name ending in {suffix})")
    return rule


def _special_tokens(value: Any, where: str) -> dict[str, Any]:
    """``special_tokens: {pad_token: ...}`` changes nothing LEMA computes (padding carries no loss and
    is masked); any other token would change the vocabulary or what ends a sequence."""
    if isinstance(value, dict) and set(value) <= {"pad_token"}:
        return {NOTE: f"{where}: LEMA masks padding, so the pad token changes nothing; the tokenizer's own is used"}
    raise ConfigError(f"{where}: not supported: LEMA does not change the tokenizer's special tokens or add tokens "
                      "(it would need a trained embedding); keep only pad_token, or remove the key")


def _report_to(value: Any, where: str) -> dict[str, Any]:
    names = value if isinstance(value, list) else [value]
    names = [str(n) for n in names if str(n) not in ("none", "None", "")]
    if "all" in names:
        raise ConfigError(f"{where}: 'all' names no sink in LEMA; list them: tensorboard, wandb")
    return {"report_to": ",".join(names) or "none"}


def _targets(value: Any, where: str) -> dict[str, Any]:
    if value == "all-linear" or value == ["all-linear"]:
        return {"targets": "all-linear"}
    if isinstance(value, str):
        return {"targets": value}
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and value:
        return {"targets": ",".join(value)}
    raise ConfigError(f"{where}: {value!r} must be a list of module names, or all-linear")


def _target_linear(value: Any, where: str) -> dict[str, Any]:
    return {"targets": "all-linear"} if value is True else {}


def _adapter(value: Any, where: str) -> dict[str, Any]:
    if value == "lora":
        return {}
    if value == "qlora":
        raise ConfigError(f"{where}: qlora: LEMA trains LoRA on a model stored quantized: convert it once with "
                          "`lema convert MODEL OUT.safetensors --quantize nf4`, then give that file as base_model "
                          "with adapter: lora")
    raise ConfigError(f"{where}: {value!r}: LEMA trains LoRA adapters (adapter: lora)")


def _load_in(bits: str) -> Rule:
    def rule(value: Any, where: str) -> dict[str, Any]:
        if not value:
            return {}
        raise ConfigError(f"{where}: LEMA reads the weights as stored; to train on {bits}-bit weights convert the "
                          f"model once with `lema convert MODEL OUT.safetensors --quantize "
                          f"{'nf4' if bits == '4' else 'int8'}` and give that file as the model")
    return rule


def _strategy(option: str) -> Rule:
    def rule(value: Any, where: str) -> dict[str, Any]:
        if value in ("steps", "no"):
            return {}
        raise ConfigError(f"{where}: {value!r}: LEMA counts optimizer steps; give {option} N (steps) instead")
    return rule


def _eval_split(value: Any, where: str) -> dict[str, Any]:
    if value in (0, 0.0):
        return {}
    return {"eval_split": value}


def _wandb_project(value: Any, where: str) -> dict[str, Any]:
    return {"report_to": "wandb"} if value else {}


def _loss_only(value: Any, where: str) -> dict[str, Any]:
    """TRL's completion_only_loss / assistant_only_loss: true is LEMA's default."""
    if value is None:
        return {}
    return {"train_on_inputs": not bool(value)}


def _chat_template(value: Any, where: str) -> dict[str, Any]:
    if value in ("tokenizer_default", None):
        return {}
    return {"chat_template": value}


def _datasets(value: Any, where: str) -> dict[str, Any]:
    """axolotl's ``datasets:`` list: each entry's path, and the field mapping they share."""
    if not isinstance(value, list) or not value or not all(isinstance(d, dict) for d in value):
        raise ConfigError(f"{where}: must be a list of data sets, each with a path")
    out: dict[str, Any] = {"data": []}
    shared: dict[str, Any] = {}
    for i, entry in enumerate(value, start=1):
        here = f"{where}[{i}]"
        mapping: dict[str, Any] = {}
        for key, item in entry.items():
            rule = DATASET_KEYS.get(str(key))
            if rule is None:
                raise ConfigError(f"{here}: unknown key {key!r}" + did_you_mean(str(key), DATASET_KEYS)
                                  + f"; a data set's keys are {', '.join(sorted(DATASET_KEYS))}")
            mapping.update(rule(item, f"{here}.{key}"))
        if "data" not in mapping:
            raise ConfigError(f"{here}: no path; give each data set a path (a file, a folder or a Hub id)")
        out["data"].append(mapping.pop("data"))
        for key, item in mapping.items():
            if key in shared and shared[key] != item:
                raise ConfigError(f"{here}: {key} {item!r} differs from an earlier data set's {shared[key]!r}; "
                                  "LEMA reads every data set with the same field mapping")
            shared[key] = item
    out.update(shared)
    return out


def _path(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a path or a Hub id")
    return {"data": value}


def _split(value: Any, where: str) -> dict[str, Any]:
    if value != "train":
        raise ConfigError(f"{where}: {value!r}: give the split in the path as owner/name:{value}")
    return {}


def _type(value: Any, where: str) -> dict[str, Any]:
    formats = {"chat_template": "messages", "sharegpt": "sharegpt", "alpaca": "alpaca", "completion": "text",
               "input_output": "prompt-completion", "pretrain": "text"}
    if isinstance(value, str) and value in formats:
        return {"data_format": formats[value]}
    raise ConfigError(f"{where}: {value!r} is not a data set type LEMA reads; use one of {', '.join(formats)}")


def _property_mappings(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not set(value) <= {"role", "content"}:
        raise ConfigError(f"{where}: must map role and content to the message's keys, e.g. "
                          "{role: speaker, content: text}")
    return {k: v for k, v in (("role_key", value.get("role")), ("content_key", value.get("content"))) if v}


def _roles(value: Any, where: str) -> dict[str, Any]:
    """axolotl's ``roles: {user: [human], assistant: [gpt]}`` -> ``human=user,gpt=assistant``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must map each role to the data's names for it, e.g. {{user: [human]}}")
    pairs = []
    for role, names in value.items():
        for name in names if isinstance(names, list) else [names]:
            pairs.append(f"{name}={role}")
    return {"role_names": ",".join(pairs)}


def _roles_to_train(value: Any, where: str) -> dict[str, Any]:
    names = value if isinstance(value, list) else [value]
    return {"roles_to_train": ",".join(map(str, names))}


DATASET_KEYS: dict[str, Rule] = {
    "path": _path, "split": _split, "type": _type, "field_messages": _same("messages_field"),
    "message_property_mappings": _property_mappings,
    "message_field_role": _same("role_key"), "message_field_content": _same("content_key"), "roles": _roles, "roles_to_train": _roles_to_train,
    "chat_template": _chat_template, "field": _same("text_field"), "field_instruction": _agree(
        "instruction", "LEMA's Alpaca records use instruction/input/output"),
    "field_output": _agree("output", "LEMA's Alpaca records use instruction/input/output"),
    "train_on_eos": _agree(("turn", "all"), "LEMA trains on each trained turn's end-of-turn token"),
    "ds_type": _agree("json", "LEMA detects the file type from its suffix"),
}

# Keys whose value needs translating (both formats; the 1:1 ones are option aliases).
RULES: dict[str, Rule] = {
    "num_train_epochs": _whole("epochs", "epochs"), "num_epochs": _whole("epochs", "epochs"),
    "max_steps": _max_steps,
    "bf16": _precision("bfloat16"), "fp16": _precision("float16"), "fp32": _precision("float32"),
    "report_to": _report_to, "lora_target_modules": _targets, "lora_target_linear": _target_linear,
    "gradient_checkpointing": _agree(True, "LEMA always checkpoints each layer's input (that is how it streams)"),
    "use_peft": _agree(True, "LEMA trains LoRA adapters"),
    "eval_strategy": _strategy("eval_steps"), "evaluation_strategy": _strategy("eval_steps"),
    "save_strategy": _strategy("save_steps"), "logging_strategy": _strategy("logging_steps"),
    "do_train": _agree(True, "lema train trains"), "do_eval": _agree((True, False), ""),
    "load_in_4bit": _load_in("4"), "load_in_8bit": _load_in("8"),
    "completion_only_loss": _loss_only, "assistant_only_loss": _loss_only,
    "chat_template": _chat_template, "wandb_project": _wandb_project, "wandb_name": _same("run_name"),
    "logging_dir": _note("LEMA writes the logs into DIR (metrics.jsonl, DIR/tensorboard)"),
    "eval_accumulation_steps": _note("LEMA evaluates the loss batch by batch already"),
    "dataloader_num_workers": _note("LEMA tokenizes the data once before training; batches come from memory"),
    "per_device_eval_batch_size": _note("LEMA evaluates with --batch"),
    "overwrite_output_dir": _same("overwrite"),
    "lora_bias": _agree("none", "LEMA's adapters have no bias"), "bias": _agree("none", "LEMA's adapters have no bias"),
    "lora_task_type": _agree("CAUSAL_LM", "LEMA trains causal LMs"),
    "task_type": _agree("CAUSAL_LM", "LEMA trains causal LMs"),
    "model_type": _class_name("ForCausalLM", "LEMA reads the architecture from config.json"),
    "tokenizer_type": _class_name("Tokenizer", "LEMA loads the tokenizer with AutoTokenizer"),
    "dataset_prepared_path": _note("LEMA caches the tokenized data itself in $LEMA_CACHE/data (--no-data-cache "
                                   "to skip); this path is not used"),
    "special_tokens": _special_tokens,
    "eval_sample_packing": _note("LEMA evaluates unpacked examples (the same loss, each example alone)"),
    "loss_watchdog_threshold": _note("LEMA stops on a non-finite loss or gradient norm (saving the last good step); "
                                     "it does not watch a finite loss"),
    "loss_watchdog_patience": _note("LEMA stops on a non-finite loss or gradient norm; it does not watch a finite "
                                    "loss"),
    "base_model_config": _agree((None,), "LEMA reads the model's own config.json"),
    "tokenizer_config": _same("tokenizer"), "tokenizer_name_or_path": _same("tokenizer"),
    "dataset_train_split": _split,
    "val_set_size": _eval_split,
    # settings that only agree with what LEMA does (its attention is PyTorch SDPA, flash where the device has it)
    "flash_attention": _agree((True, False), _KERNEL), "sdp_attention": _agree((True, False), _KERNEL),
    "xformers_attention": _agree((False,), _KERNEL), "attn_implementation": _agree(("sdpa", "flash_attention_2"),
                                                                                 _KERNEL),
    "pad_to_sequence_len": _agree((True, False), "LEMA pads each batch itself (rows of --seq with --packing)"),
    "tf32": _agree((False, "auto"), "LEMA leaves TF32 to PyTorch's defaults"),
    "strict": _agree((False,), "LEMA checks every key of the file: none is ignored"),
}
RULES.update(TRL_PREFERENCE)
AXOLOTL_RULES: dict[str, Rule] = {"datasets": _datasets, "adapter": _adapter, **AXOLOTL_PREFERENCE,
                                  "lora_model_dir": _same("adapter")}


def detect(data: dict[str, Any]) -> str:
    """``axolotl``, ``hf`` (TRL and transformers share their names) or ``lema``, from the keys."""
    keys = {str(k) for k in data}
    if keys & AXOLOTL_KEYS and not keys & {"per_device_train_batch_size", "num_train_epochs", "model_name_or_path",
                                           "dataset_name"}:
        return "axolotl"
    if keys & HF_KEYS:
        return "hf"
    return "lema"


def translate(data: dict[str, Any], fmt: str, path: str, notes: list[str] | None = None) -> dict[str, Any]:
    """``data`` with the field's keys turned into LEMA's (keys LEMA knows are kept as they are);
    ``notes`` gains a line for each key accepted without effect.

    Raises:
        ConfigError: a refused key (named, with the reason) or a value with no LEMA meaning.
    """
    fmt = "hf" if fmt == "trl" else fmt
    if fmt == "lema":
        return data
    rules = {**RULES, **(AXOLOTL_RULES if fmt == "axolotl" else {})}
    notes = [] if notes is None else notes
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:  # an empty key is the library's default in these files
            continue
        where = f"--config: {path}: {key}"
        if key in REFUSED and (value is False or value in ("", "none", "no") or value == [] or value == {}):
            continue  # a setting turned off asks nothing of LEMA
        if key in REFUSED:
            raise ConfigError(f"{where}: not supported: {REFUSED[key]}; remove the key")
        rule = rules.get(str(key))
        mapped = rule(value, where) if rule is not None else {key: value}
        if NOTE in mapped:
            notes.append(mapped.pop(NOTE))
        for k, v in mapped.items():
            if k in out and out[k] != v:
                raise ConfigError(f"{where}: sets {k} to {v!r}, but another key set it to {out[k]!r}; keep one")
            out[k] = v
    return out


def known_keys(fmt: str) -> list[str]:
    """Every key a file of ``fmt`` may hold beyond the command's options (for "did you mean")."""
    fmt = "hf" if fmt == "trl" else fmt
    if fmt == "lema":
        return []
    return [*RULES, *(AXOLOTL_RULES if fmt == "axolotl" else {})]


def did_you_mean(key: str, candidates: Any) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidates, or ``""``."""
    import difflib

    close = difflib.get_close_matches(key, [str(c) for c in candidates], n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
