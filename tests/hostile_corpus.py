"""The second trust campaign (issue 25): hostile files, bad configs and bad data not in the
first corpus, each a :class:`~tests.bad_input_corpus.Case` of kind ``"hostile"``.

Every case must be refused like the rest of the corpus: exit 2, one ``Error:`` line
matching ``expect``, no traceback, bounded RAM and time. docs/trust-campaign.md records
what each group tried and what it found.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.bad_input_corpus import Case, _generate, _merge, _train

NESTED_RANGES = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                 "{{ messages[0]['content'] }}")
JINJA_ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0]['content'] }}"
HUGE_OUTPUT = "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}{{ messages[0]['content'] }}"


def _yaml_cases(root: Path) -> list[Case]:
    folder = root / "hostile" / "yaml"
    folder.mkdir(parents=True)
    good = "model: good/model\ndata: good/data.txt\nout: out/y\nsteps: 1\nbatch: 1\nseq: 16\nrank: 4\ndevice: cpu\n"
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    variants = {
        "anchor_bomb": (bomb, "anchors and aliases"),
        "one_alias": (good + "tokenizer: &t good/model\nrun-name: *t\n", "anchors and aliases"),
        "nested_5000": (good + "targets: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
        "duplicate_model": (good + "model: other/model\n", "'model' is given twice"),
        "steps_true": (good.replace("steps: 1", "steps: true"), "steps: true is not a value"),
        "model_null": (good.replace("model: good/model", "model: null"), "model: null is not a value"),
        "lr_nan": (good + "lr: .nan\n", r"lr: \.nan is not a number"),
        "weight_decay_inf": (good + "weight-decay: .inf\n", "--weight-decay: inf is not a finite number"),
        "python_tag": (good + "run-name: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
        "top_level_list": ("- model\n- data\n", "expected a mapping"),
        "binary_value": (good + "run-name: !!binary aGVsbG8=\n", "run-name: b'hello' is not a value"),
        "date_value": (good.replace("steps: 1", "steps: 1\nseed: 2024-01-01"), "seed: datetime.date"),
        "flag_string": (good + "packing: 'yes'\n", "packing: 'yes' is not true or false"),
        "nested_list_value": (good + "targets: [[q_proj], v_proj]\n", "plain names or numbers"),
        "mapping_value": (good + "targets: {q: 1}\n", "a mapping is not a value"),
        "two_documents": (good + "---\nsteps: 2\n", "invalid YAML"),
        "not_utf8": (good.encode() + b"run-name: caf\xe9\n", "not UTF-8"),
        "key_is_list": (good + "[a, b]: 1\n", "a key must be an option name"),
    }
    cases = []
    for name, (text, expect) in variants.items():
        path = folder / f"{name}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        cases.append(Case("hostile", f"yaml_{name}", str(path.relative_to(root)),
                          (("train", "--config", str(path.relative_to(root))),), expect))
    big = folder / "huge.yaml"
    with open(big, "wb") as f:
        f.write(good.encode())
        f.truncate(300 * 1024)
    cases.append(Case("hostile", "yaml_huge", "hostile/yaml/huge.yaml",
                      (("train", "--config", "hostile/yaml/huge.yaml"),), "larger than 256 KiB"))
    (folder / "a_folder.yaml").mkdir()
    cases.append(Case("hostile", "yaml_folder", "hostile/yaml/a_folder.yaml",
                      (("train", "--config", "hostile/yaml/a_folder.yaml"),), "no such file"))
    return cases


def _option_cases() -> list[Case]:
    t = ("good/model", "good/data.txt", "out/t")
    variants = {
        "weight_decay_nan": (_train(*t, "--weight-decay", "nan"), "--weight-decay: nan"),
        "max_grad_norm_inf": (_train(*t, "--max-grad-norm", "inf"), "--max-grad-norm: inf"),
        "alpha_nan": (_train(*t, "--alpha", "nan"), "--alpha: nan"),
        "dropout_nan": (_train(*t, "--lora-dropout", "nan"), "--lora-dropout: nan"),
        "eval_split_nan": (_train(*t, "--eval-split", "nan"), "--eval-split: nan"),
        "seq_beyond_context": (_train(*t, "--seq", "1000000000"), "--seq 1,000,000,000 is longer than any model's "
                               "context .*this one's is 512"),
        "plan_seq_beyond_context": (("plan", "--model", "good/model", "--seq", "1000000000"), "this one's is 512"),
        "plan_seq_beyond_builtin_context": (("plan", "--model", "llama-2-7b", "--seq", "1000000000", "--vram", "8G"),
                                            "this one's is 4,096"),
        "plan_seq_beyond_learned_positions": (("plan", "--model", "gpt2", "--seq", "4096"), "1,024 learned positions"),
        "vram_nan": (_train(*t, "--vram", "nanG"), "--vram"),
    }
    return [Case("hostile", f"option_{name}", "", (argv,), expect) for name, (argv, expect) in variants.items()]


def _template_cases(root: Path) -> list[Case]:
    folder = root / "hostile" / "templates"
    folder.mkdir(parents=True)
    chat = folder / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                       {"role": "assistant", "content": f"hello {i}"}]})
                              for i in range(4)) + "\n", encoding="utf-8")
    templates = {
        "nested_ranges": (NESTED_RANGES, "more than 5 s"),
        "jinja_escape": (JINJA_ESCAPE, "sandbox forbids"),
        "huge_output": (HUGE_OUTPUT, "wrote 10,000,0"),
        "syntax_error": ("{% for %}", "template"),
        "raises": ("{{ raise_exception('no chat here') }}", "no chat here"),
    }
    cases = []
    for name, (text, expect) in templates.items():
        path = folder / f"{name}.jinja"
        path.write_text(text, encoding="utf-8")
        rel = str(path.relative_to(root))
        commands = [_generate("good/model", "--chat", "--chat-template", rel)]
        if name in ("nested_ranges", "jinja_escape", "huge_output"):  # a template refused as a whole
            commands.append(_train("good/model", str(chat.relative_to(root)), "out/t", "--chat-template", rel))
        cases.append(Case("hostile", f"template_{name}", rel, tuple(commands), expect))
    big = folder / "big.jinja"
    big.write_text("{{ messages[0]['content'] }}" + "{# padding #}" * 30_000, encoding="utf-8")
    cases.append(Case("hostile", "template_too_long", "hostile/templates/big.jinja", (
        _train("good/model", str(chat.relative_to(root)), "out/t", "--chat-template", "hostile/templates/big.jinja"),),
        "characters long"))
    # The same hostile templates arriving inside a model's own tokenizer_config.json.
    for name in ("nested_ranges", "jinja_escape"):
        model = root / "hostile" / f"model_template_{name}"
        shutil.copytree(root / "good" / "model", model)
        config = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": templates[name][0]}))
        (model / "chat_template.jinja").unlink(missing_ok=True)
        rel = str(model.relative_to(root))
        cases.append(Case("hostile", f"model_template_{name}", f"{rel}/tokenizer_config.json", (
            ("generate", "--model", rel, "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2", "--chat"),
            ("train", "--model", rel, "--data", str(chat.relative_to(root)), "--out", "out/t", "--steps", "1",
             "--batch", "1", "--seq", "16", "--rank", "4", "--device", "cpu")), templates[name][1]))
    return cases


def _poisoned_model(root: Path, name: str, tensor: str, value: float) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    folder = root / "hostile" / name
    shutil.copytree(root / "good" / "model", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    key = next(k for k in tensors if tensor in k)
    poisoned = tensors[key].clone()
    poisoned.view(-1)[3] = value
    tensors[key] = poisoned
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder.relative_to(root))


def _weight_cases(root: Path) -> list[Case]:
    import torch
    from safetensors.torch import load_file, save_file

    cases = []
    for name, tensor, value in (("nan_layer", "layers.0.self_attn.q_proj", float("nan")),
                                ("inf_embedding", "embed_tokens", float("inf")),
                                ("nan_head", "lm_head", float("nan")),
                                ("neg_inf_norm", "layers.1.post_attention_layernorm", float("-inf"))):
        rel = _poisoned_model(root, name, tensor, value)
        cases.append(Case("hostile", f"weights_{name}", f"{rel}/model.safetensors", (
            _generate(rel), _train(rel), ("convert", rel, "out/c.safetensors", "--device", "cpu")),
            "holds NaN or infinite values"))
    # merge reads a single file with its config in the metadata: poison a copy of the mono file
    mono = load_file(str(root / "good" / "mono.safetensors"))
    from safetensors import safe_open

    with safe_open(str(root / "good" / "mono.safetensors"), framework="pt") as f:
        meta = f.metadata()
    key = next(k for k in mono if "norm" in k)
    mono[key] = torch.full_like(mono[key], float("nan"))
    save_file(mono, str(root / "hostile" / "nan_mono.safetensors"), metadata=meta)
    cases.append(Case("hostile", "weights_nan_merge_base", "hostile/nan_mono.safetensors",
                      (_merge("hostile/nan_mono.safetensors"),), "holds NaN or infinite values"))
    # checkpoints holding NaN: the adapter, then the optimizer state
    for name, file in (("adapter", "adapter_model.safetensors"), ("optimizer", "optimizer.safetensors")):
        run = root / "hostile" / f"nan_{name}_run"
        shutil.copytree(root / "good" / "run", run)
        path = run / "checkpoint-1" / file
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        key = sorted(tensors)[0]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        path.unlink()
        save_file(tensors, str(path), metadata=meta)
        rel = str(run.relative_to(root))
        commands = [_train("good/model", "good/data.txt", rel, "--resume", "--steps", "2")]
        if name == "adapter":
            commands += [_generate("good/model", "--adapter", f"{rel}/checkpoint-1"),
                         _merge("good/mono.safetensors", f"{rel}/checkpoint-1")]
        cases.append(Case("hostile", f"checkpoint_nan_{name}", str(path.relative_to(root)), tuple(commands),
                          f"{file}: tensor .* holds NaN or infinite values"))
    return cases


def _run_folder_cases(root: Path) -> list[Case]:
    cases = []
    layouts = {
        "user_folder": lambda run: (run / "checkpoint-2").mkdir() or (run / "checkpoint-2" / "notes.txt").write_text("x"),
        "user_file": lambda run: (run / "checkpoint-2").write_text("my notes"),
        "final_file": lambda run: (run / "final").write_text("not an adapter"),
        "final_symlink": lambda run: (run / "final").symlink_to(run / "checkpoint-1", target_is_directory=True),
        "extra_file_in_checkpoint": lambda run: shutil.copytree(run / "checkpoint-1", run / "checkpoint-2")
        and (run / "checkpoint-2" / "my_eval.txt").write_text("keep me"),
    }
    for name, make in layouts.items():
        run = root / "hostile" / f"run_{name}"
        shutil.copytree(root / "good" / "run", run)
        make(run)
        rel = str(run.relative_to(root))
        cases.append(Case("hostile", f"run_{name}", rel, (
            _train("good/model", "good/data.txt", rel, "--resume", "--steps", "3", "--save-steps", "1",
                   "--save-total-limit", "1"),), "named like a checkpoint this run would save but not one LEMA"))
    return cases


def _file_kind_cases(root: Path) -> list[Case]:
    folder = root / "hostile" / "kinds"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "pipe.txt")
    (folder / "zero.txt").symlink_to("/dev/zero")
    (folder / "loop.txt").symlink_to(folder / "loop.txt")
    loop_model = folder / "loop_model"
    shutil.copytree(root / "good" / "model", loop_model)
    (loop_model / "config.json").unlink()
    (loop_model / "config.json").symlink_to(loop_model / "config.json")
    fifo_model = folder / "fifo_model"
    shutil.copytree(root / "good" / "model", fifo_model)
    (fifo_model / "config.json").unlink()
    os.mkfifo(fifo_model / "config.json")
    big_tok = folder / "big_tokenizer"
    shutil.copytree(root / "good" / "model", big_tok)
    with open(big_tok / "tokenizer.json", "r+b") as f:
        f.truncate(2 * 1024**3)  # sparse: 2 GiB without writing it
    fifo_tok = folder / "fifo_tokenizer"
    shutil.copytree(root / "good" / "model", fifo_tok)
    (fifo_tok / "tokenizer_config.json").unlink()
    os.mkfifo(fifo_tok / "tokenizer_config.json")
    deep_tok = folder / "deep_tokenizer"
    shutil.copytree(root / "good" / "model", deep_tok)
    (deep_tok / "tokenizer.json").write_text("[" * 200_000 + "]" * 200_000)
    state_fifo = folder / "fifo_state_run"
    shutil.copytree(root / "good" / "run", state_fifo)
    (state_fifo / "checkpoint-1" / "trainer_state.json").unlink()
    os.mkfifo(state_fifo / "checkpoint-1" / "trainer_state.json")
    adapter_fifo = folder / "fifo_adapter"
    shutil.copytree(root / "good" / "run" / "checkpoint-1", adapter_fifo)
    (adapter_fifo / "adapter_config.json").unlink()
    os.mkfifo(adapter_fifo / "adapter_config.json")
    k = "hostile/kinds"
    return [
        Case("hostile", "data_fifo", f"{k}/pipe.txt", (_train("good/model", f"{k}/pipe.txt"),), "is not a file"),
        Case("hostile", "data_dev_zero", f"{k}/zero.txt", (_train("good/model", f"{k}/zero.txt"),), "is not a file"),
        Case("hostile", "data_symlink_loop", k, (_train("good/model", f"{k}/loop.txt"),),  # a loop does not "exist"
             "symbolic links|no such data"),
        Case("hostile", "config_symlink_loop", f"{k}/loop_model", (
            ("plan", "--model", f"{k}/loop_model"), _generate(f"{k}/loop_model")), "config"),
        Case("hostile", "config_fifo", f"{k}/fifo_model/config.json", (
            ("plan", "--model", f"{k}/fifo_model"), _train(f"{k}/fifo_model"), _generate(f"{k}/fifo_model")),
             "config"),
        Case("hostile", "tokenizer_2gib", f"{k}/big_tokenizer/tokenizer.json", (
            _train("good/model", "good/data.txt", "out/t", "--tokenizer", f"{k}/big_tokenizer"),
            ("generate", "--model", "good/model", "--tokenizer", f"{k}/big_tokenizer", "--prompt", "hi",
             "--device", "cpu")), "far larger than any tokenizer file"),
        Case("hostile", "tokenizer_config_fifo", f"{k}/fifo_tokenizer/tokenizer_config.json", (
            _train("good/model", "good/data.txt", "out/t", "--tokenizer", f"{k}/fifo_tokenizer"),),
             "not a regular file"),
        Case("hostile", "tokenizer_deep_json", f"{k}/deep_tokenizer/tokenizer.json", (
            _train("good/model", "good/data.txt", "out/t", "--tokenizer", f"{k}/deep_tokenizer"),),
             "tokenizer"),
        Case("hostile", "trainer_state_fifo", f"{k}/fifo_state_run/checkpoint-1/trainer_state.json", (
            _train("good/model", "good/data.txt", f"{k}/fifo_state_run", "--resume", "--steps", "2"),),
             "trainer_state.json|no usable checkpoint"),
        Case("hostile", "adapter_config_fifo", f"{k}/fifo_adapter/adapter_config.json", (
            _generate("good/model", "--adapter", f"{k}/fifo_adapter"),
            _merge("good/mono.safetensors", f"{k}/fifo_adapter")), "adapter_config.json"),
    ]


def _data_cases(root: Path) -> list[Case]:
    folder = root / "hostile" / "data"
    folder.mkdir(parents=True)
    variants = {
        "role_number.jsonl": ('{"messages": [{"role": 5, "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
                              "role"),
        "content_null.jsonl": ('{"messages": [{"role": "user", "content": null}, '
                               '{"role": "assistant", "content": "y"}]}\n', "content"),
        "messages_empty.jsonl": ('{"messages": []}\n', "messages"),
        "messages_string.jsonl": ('{"messages": "hi"}\n', "messages"),
        "sharegpt_bad_from.jsonl": ('{"conversations": [{"from": 7, "value": "x"}]}\n', "from"),
        "prompt_object.jsonl": ('{"prompt": {"a": 1}, "completion": "c"}\n', "must be a string"),
        "alpaca_output_number.jsonl": ('{"instruction": "i", "input": "", "output": 5}\n', "must be a string"),
        "csv_wrong_column.csv": ("title\nhello\n", "text|datasets"),
    }
    cases = []
    for name, (text, expect) in variants.items():
        (folder / name).write_text(text, encoding="utf-8")
        rel = f"hostile/data/{name}"
        cases.append(Case("hostile", f"data_{name}", rel, (_train("good/model", rel),), expect))
    return cases


def _disk_cases() -> list[Case]:
    return [
        Case("hostile", "disk_full_convert", "good/model", (("convert", "good/model", "out/c.safetensors", "--device",
                                                            "cpu"),), "out/c.safetensors: could not write it",
             fsize=16 * 1024),
        Case("hostile", "disk_full_merge_names_out", "good/run", (_merge("good/mono.safetensors"),),
             "out/merged.safetensors: could not write it", fsize=16 * 1024),
        Case("hostile", "disk_full_train_args", "good/model", (_train("good/model"),), "train_args.json|File too large",
             fsize=512),
        Case("hostile", "disk_full_demo", "", (("demo", "--size", "tiny", "--steps", "1", "--out", "out/demo"),),
             "File too large|disk space|could not write", fsize=16 * 1024),
    ]


def hostile_cases(root: Path) -> list[Case]:
    """Write the campaign's files under ``root`` (beside the first corpus's good inputs)."""
    return [*_yaml_cases(root), *_option_cases(), *_template_cases(root), *_weight_cases(root),
            *_run_folder_cases(root), *_file_kind_cases(root), *_data_cases(root), *_disk_cases()]
