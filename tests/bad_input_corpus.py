"""A corpus of bad inputs for every ``lema`` command: headers, configs, indexes, data, checkpoints.

:func:`build_corpus` writes well over 100 small bad files (plus one good model, data file
and checkpoint they are variations of) under a folder and returns the :class:`Case` s:
each names its bad file, the command lines that read it and a fragment the one ``Error:``
line must contain (the field or problem it names). ``tests/bad_input_runner.py`` runs
them in a fresh process and ``tests/integration/cli/test_bad_input_corpus.py`` checks
every result: exit 2, exactly one ``Error:`` line, no traceback, bounded RAM and time.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import attrs

KINDS = ("header", "config", "index", "data", "checkpoint", "option", "hostile")
BAD = "\ud800"  # a lone surrogate, as json.dumps escapes it


@attrs.frozen
class Case:
    """One bad input and the commands that read it.

    Attributes:
        kind: one of :data:`KINDS`.
        name: unique within the kind.
        path: the bad file, relative to the corpus root ("" for a bad option).
        commands: ``lema`` argument lists (paths relative to the root, the runner's cwd).
        expect: a regular expression the error line matches (case-insensitive): the
            field or problem it names.
        fsize: a file-size limit (bytes) while the commands run, to simulate a full disk.
    """

    kind: str
    name: str
    path: str
    commands: tuple[tuple[str, ...], ...]
    expect: str
    fsize: int | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


# -- the good inputs the bad ones are variations of ------------------------------------------


def build_good(root: Path) -> None:
    """``good/model`` (a tiny Llama folder + tokenizer), ``good/mono.safetensors`` (config in
    its metadata), ``good/data.txt`` / ``.jsonl`` and ``good/run/checkpoint-1`` (after one step)."""
    import torch
    from transformers import LlamaForCausalLM

    from lema import LemaConfig, LemaModel
    from tests.demo_models import tiny_llama_folder, write_data
    from tests.model_files import save_monolithic

    good = root / "good"
    tiny_llama_folder(good / "model")
    model = LlamaForCausalLM.from_pretrained(good / "model")
    save_monolithic(model, good / "mono.safetensors")
    data = write_data(good / "data")
    shutil.copyfile(data["txt"], good / "data.txt")
    shutil.copyfile(data["text"], good / "data.jsonl")
    config = LemaConfig(model_name_or_path=str(good / "model"), lora_rank=4, device="cpu", max_seq_len=16)
    with LemaModel(config) as lema:
        lema.initialize_lora()
        trainer = lema.get_trainer(torch.optim.AdamW(lema.get_trainable_parameters(), lr=1e-3))
        trainer.train_step(torch.arange(1, 17)[None])
        trainer.save_checkpoint(good / "run" / "checkpoint-1")
    (good / "run" / "train_args.json").write_text("{}", encoding="utf-8")


def _train(model: str, data: str = "good/data.txt", out: str = "out/train", *extra: str) -> tuple[str, ...]:
    return ("train", "--model", model, "--data", data, "--out", out, "--tokenizer", "good/model", "--steps", "1",
            "--batch", "1", "--seq", "16", "--rank", "4", "--device", "cpu", *extra)


def _generate(model: str, *extra: str) -> tuple[str, ...]:
    return ("generate", "--model", model, "--prompt", "hello", "--tokenizer", "good/model", "--device", "cpu",
            "--max-new-tokens", "2", *extra)


def _merge(base: str, adapter: str = "good/run/checkpoint-1") -> tuple[str, ...]:
    return ("merge", "--base", base, "--adapter", adapter, "--out", "out/merged.safetensors")


def _bench(model: str) -> tuple[str, ...]:
    return ("bench", "--model", model, "--no-reference", "--steps", "1", "--warmup", "0", "--batch", "1",
            "--seq", "8", "--workdir", "out/bench")


def _safetensors(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _good_header(root: Path) -> tuple[dict[str, Any], bytes]:
    raw = (root / "good" / "model" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


# -- headers ----------------------------------------------------------------------------------


def header_cases(root: Path) -> list[Case]:
    header, data = _good_header(root)
    first = next(k for k in header if k != "__metadata__")
    entry = header[first]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]

    def with_entry(**change: Any) -> dict[str, Any]:
        return {**header, first: {**entry, **change}}

    second = next(k for k in header if k not in ("__metadata__", first))
    overlap = {**header, second: {**header[second], "data_offsets": [entry["data_offsets"][0] + 4,
               entry["data_offsets"][0] + 4 + header[second]["data_offsets"][1] - header[second]["data_offsets"][0]]}}
    config = json.loads((root / "good" / "model" / "config.json").read_text())
    many = b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
                            for i in range(300_000)) + b"}"
    variants: dict[str, tuple[bytes, str]] = {
        "empty": (b"", "too short"),
        "seven_bytes": (b"\x01" * 7, "too short"),
        "length_huge": (_safetensors(b"{}", length=2**63), "header length"),
        "length_past_end": (_safetensors(b"{}", length=4096), "header length"),
        "length_zero": (_safetensors(b"", length=0), "not valid JSON"),
        "not_utf8": (_safetensors(b'{"\xff": 1}'), "not UTF-8"),
        "not_json": (_safetensors(b"{not json"), "not valid JSON"),
        "json_array": (_safetensors([1, 2, 3]), "not a JSON object"),
        "json_string": (_safetensors("weights"), "not a JSON object"),
        "nested_deep": (_safetensors(b"[" * 100_000 + b"]" * 100_000), "nested deeper"),
        "huge_integer": (_safetensors(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000
                                      + b"]}}"), "out of range"),
        "surrogate_name": (_safetensors(b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                                        b"\0" * 4), "surrogate"),
        "entry_number": (_safetensors({**header, first: 5}, data), "malformed entry"),
        "entry_list": (_safetensors({**header, first: [1]}, data), "malformed entry"),
        "dtype_unknown": (_safetensors(with_entry(dtype="F8_E9"), data), "malformed entry"),
        "dtype_list": (_safetensors(with_entry(dtype=["F32"]), data), "malformed entry"),
        "shape_negative": (_safetensors(with_entry(shape=[-1, 32]), data), "malformed entry"),
        "shape_float": (_safetensors(with_entry(shape=[2.5]), data), "malformed entry"),
        "shape_bool": (_safetensors(with_entry(shape=[True]), data), "malformed entry"),
        "shape_string": (_safetensors(with_entry(shape="32"), data), "malformed entry"),
        "shape_huge": (_safetensors(with_entry(shape=[2**62, 2**62]), data), "does not match"),
        "offsets_reversed": (_safetensors(with_entry(data_offsets=entry["data_offsets"][::-1]), data),
                             "does not match"),
        "offsets_negative": (_safetensors(with_entry(data_offsets=[-size, 0]), data), "malformed entry"),
        "offsets_three": (_safetensors(with_entry(data_offsets=[0, size, 0]), data), "malformed entry"),
        "offsets_float": (_safetensors(with_entry(data_offsets=[0.0, float(size)]), data), "malformed entry"),
        "offsets_past_end": (_safetensors(with_entry(data_offsets=[len(data), len(data) + size]), data),
                             "past the end"),
        "overlapping": (_safetensors(overlap, data), "overlap"),
        "truncated_data": (_safetensors(header, data[: len(data) // 2]), "past the end"),
        "metadata_list": (_safetensors({**header, "__metadata__": ["x"]}, data), "__metadata__"),
        "metadata_number_value": (_safetensors({**header, "__metadata__": {"format": 5}}, data), "__metadata__"),
        "metadata_config_not_json": (_safetensors({**header, "__metadata__": {"config": "{oops"}}, data),
                                     "metadata is not valid"),
        "metadata_config_deep": (_safetensors({**header, "__metadata__": {"config": "[" * 5000 + "]" * 5000}},
                                              data), "nested deeper"),
        "metadata_config_list": (_safetensors({**header, "__metadata__": {"config": "[1]"}}, data),
                                 "not a JSON object"),
        "metadata_config_bad_field": (_safetensors({**header, "__metadata__": {
            "config": json.dumps({**config, "hidden_size": "32"})}}, data), "hidden_size='32'"),
        "metadata_config_huge_layers": (_safetensors({**header, "__metadata__": {
            "config": json.dumps({**config, "num_hidden_layers": 10**8})}}, data), "num_hidden_layers"),
        "weights_int8": (_safetensors({**header, first: {**entry, "dtype": "I8", "data_offsets": [
            entry["data_offsets"][0], entry["data_offsets"][0] + size // 4]}}, data), "not a floating-point"),
        "other_model": (_safetensors({"x.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                     b"\0" * 4), "no recognisable"),
        "too_many_tensors": (_safetensors(many), "more than"),
    }
    # lema convert, bench and train read the config.json beside the file, not the metadata's
    # config; lema merge needs the config in the metadata of a single file.
    metadata_only = {n for n in variants if n.startswith("metadata_config")}
    cases = []
    for name, (content, expect) in variants.items():
        folder = root / "headers" / name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(content)
        shutil.copyfile(root / "good" / "model" / "config.json", folder / "config.json")
        file = f"headers/{name}/model.safetensors"
        commands = [("plan", "--model", file), _generate(file), _merge(file)]
        if name not in metadata_only:  # lema train prefers the config.json beside the file
            commands += [_train(file), ("convert", f"headers/{name}", "out/converted.safetensors", "--device", "cpu"),
                         _bench(f"headers/{name}")]
        if name in ("weights_int8", "other_model"):
            expect += "|no config in the file's metadata"  # merge reads a single file's config from there
        cases.append(Case("header", name, file, tuple(commands), expect))
    folder = root / "headers" / "is_a_folder.safetensors"
    folder.mkdir(parents=True)
    cases.append(Case("header", "is_a_folder", "headers/is_a_folder.safetensors", (
        ("plan", "--model", "headers/is_a_folder.safetensors"),), "safetensors"))
    return cases


# -- config.json ------------------------------------------------------------------------------


def config_cases(root: Path) -> list[Case]:
    good = json.loads((root / "good" / "model" / "config.json").read_text())
    good.pop("rope_parameters", None)  # the flat rope_theta of older configs, to vary it below
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 300, "n_positions": 64}
    variants: dict[str, tuple[Any, str]] = {}
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        for label, value in (("string", "32"), ("float", 32.0), ("list", [32]), ("bool", True), ("zero", 0),
                             ("negative", -4), ("huge", 10**30)):
            variants[f"{field}_{label}"] = ({**good, field: value}, field)
        variants[f"{field}_null"] = ({**good, field: None}, f"missing {field}")
    variants.update({
        "layers_10000": ({**good, "num_hidden_layers": 10_000}, "num_hidden_layers=10000 is more"),
        "layers_1e8": ({**good, "num_hidden_layers": 10**8}, "num_hidden_layers"),
        "hidden_1e6": ({**good, "hidden_size": 10**6}, "hidden_size"),
        "vocab_1e9": ({**good, "vocab_size": 10**9}, "vocab_size"),
        "intermediate_1e9": ({**good, "intermediate_size": 10**9}, "intermediate_size"),
        "heads_not_dividing": ({**good, "head_dim": None, "num_attention_heads": 5}, "not a multiple"),
        "kv_heads_not_dividing": ({**good, "num_key_value_heads": 3}, "num_key_value_heads"),
        "kv_heads_string": ({**good, "num_key_value_heads": "2"}, "num_key_value_heads"),
        "head_dim_string": ({**good, "head_dim": "8"}, "head_dim"),
        "head_dim_huge": ({**good, "head_dim": 10**7}, "head_dim"),
        "max_positions_zero": ({**good, "max_position_embeddings": 0}, "max_position_embeddings"),
        "max_positions_float": ({**good, "max_position_embeddings": 512.5}, "max_position_embeddings"),
        "max_positions_huge": ({**good, "max_position_embeddings": 10**12}, "max_position_embeddings"),
        "tie_string": ({**good, "tie_word_embeddings": "false"}, "tie_word_embeddings"),
        "attention_bias_number": ({**good, "attention_bias": 1}, "attention_bias"),
        "rms_norm_eps_string": ({**good, "rms_norm_eps": "1e-6"}, "rms_norm_eps"),
        "rms_norm_eps_negative": ({**good, "rms_norm_eps": -1e-6}, "rms_norm_eps"),
        "rms_norm_eps_nan": (json.dumps({**good, "rms_norm_eps": float("nan")}), "rms_norm_eps"),
        "hidden_act_number": ({**good, "hidden_act": 5}, "hidden_act"),
        "hidden_act_unknown": ({**good, "hidden_act": "swishy"}, "hidden_act"),
        "rope_theta_string": ({**good, "rope_theta": "10000"}, "rope_theta"),
        "rope_theta_negative": ({**good, "rope_theta": -1}, "rope_theta"),
        "rope_scaling_string": ({**good, "rope_scaling": "linear"}, "rope_scaling"),
        "rope_scaling_unknown_type": ({**good, "rope_scaling": {"rope_type": "spiral", "factor": 2.0}}, "rope_type"),
        "rope_scaling_factor_string": ({**good, "rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
        "rope_scaling_llama3_incomplete": ({**good, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                                           "rotary|rope"),
        "sliding_window_string": ({**good, "sliding_window": "4096"}, "sliding_window"),
        "layer_types_wrong_length": ({**good, "layer_types": ["full_attention"]}, "layer_types"),
        "layer_types_unknown": ({**good, "layer_types": ["dense", "dense"]}, "layer_types"),
        "model_type_number": ({**good, "model_type": 5}, "model_type"),
        "model_type_list": ({**good, "model_type": ["llama"]}, "model_type"),
        "model_type_unknown": ({**good, "model_type": "bert", "architectures": 5}, "model_type 'bert'"),
        "model_type_missing": ({k: v for k, v in good.items() if k != "model_type"}, "model_type"),
        "dtype_int": ({**good, "dtype": "int8", "torch_dtype": None}, "floating-point dtype"),
        "dtype_unknown": ({**good, "dtype": "float12"}, "floating-point dtype"),
        "gpt2_embd_string": ({**gpt2, "n_embd": "32"}, "n_embd"),
        "gpt2_heads_not_dividing": ({**gpt2, "n_head": 5}, "not a multiple"),
        "gpt2_positions_zero": ({**gpt2, "n_positions": 0}, "n_positions"),
        "gpt2_eps_string": ({**gpt2, "layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon"),
        "gpt2_activation_unknown": ({**gpt2, "activation_function": "tanhh"}, "activation_function"),
        "gpt2_inner_string": ({**gpt2, "n_inner": "128"}, "n_inner"),
        "array": ([good], "found an array"),
        "string": ('"llama"', "found a string"),
        "number": (7, "found a number"),
        "nested_deep": ("[" * 100_000 + "]" * 100_000, "nested deeper"),
        "not_json": ("{model_type: llama}", "not a valid .*invalid JSON"),
        "empty": ("", "not a valid .*invalid JSON"),
        "surrogate": (json.dumps({**good, "model_type": BAD}), "surrogate"),
        "huge_integer": ('{"model_type": "llama", "hidden_size": ' + "1" * 5000 + "}", "out of range"),
    })
    cases = []
    for name, (value, expect) in variants.items():
        folder = root / "configs" / name
        folder.mkdir(parents=True)
        text = value if isinstance(value, str) else json.dumps(value)
        (folder / "config.json").write_text(text, encoding="utf-8")
        os.link(root / "good" / "model" / "model.safetensors", folder / "model.safetensors")
        d = f"configs/{name}"
        if name.startswith("dtype_"):  # with weights, their dtype is the header's: only a bare config plans it
            commands = [("plan", "--model", f"{d}/config.json")]
        elif name == "rope_scaling_llama3_incomplete":  # found by transformers' rope functions, when a model opens
            commands = [_train(d), _generate(d)]
        else:
            commands = [("plan", "--model", f"{d}/config.json"), ("plan", "--model", d), _train(d), _generate(d),
                        ("convert", d, "out/converted.safetensors", "--device", "cpu"), _merge(d), _bench(d)]
        cases.append(Case("config", name, f"{d}/config.json", tuple(commands), expect))
    big = root / "configs" / "huge_file"
    big.mkdir(parents=True)
    with open(big / "config.json", "wb") as f:
        f.write(b'{"model_type": "llama", "pad": "')
        f.truncate(80 * 1024 * 1024)  # sparse: 80 MiB without writing it
    cases.append(Case("config", "huge_file", "configs/huge_file/config.json",
                      (("plan", "--model", "configs/huge_file/config.json"),), "far larger"))
    return cases


# -- model.safetensors.index.json -------------------------------------------------------------


def index_cases(root: Path) -> list[Case]:
    header, _ = _good_header(root)
    names = [k for k in header if k != "__metadata__"]
    good_map = {n: "model-00001-of-00001.safetensors" for n in names}
    outside = root / "outside"
    outside.mkdir()
    shutil.copyfile(root / "good" / "model" / "model.safetensors", outside / "weights.safetensors")
    variants: dict[str, tuple[Any, str]] = {
        "parent_path": ({n: "../../outside/weights.safetensors" for n in names}, "not a file name"),
        "absolute_path": ({n: str(outside / "weights.safetensors") for n in names}, "not a file name"),
        "subfolder": ({n: "sub/model.safetensors" for n in names}, "not a file name"),
        "numeric_shard": ({n: 5 for n in names}, "shard 5 is not"),
        "null_shard": ({n: None for n in names}, "shard None"),
        "list_shard": ({n: ["a.safetensors"] for n in names}, "is not a file name"),
        "mixed_types": ({**good_map, names[0]: 7}, "shard 7"),
        "empty_name": ({n: "" for n in names}, "shard '' is not"),
        "dot_name": ({n: "." for n in names}, "shard '.' is not"),
        "missing_shard": ({n: "model-00002-of-00002.safetensors" for n in names}, "missing"),
        "shard_is_folder": ({n: "folder.safetensors" for n in names}, "not a file"),
        "symlink_escape": ({n: "linked.safetensors" for n in names}, "outside the model folder"),
        "tensor_in_no_shard": ({**good_map, "model.extra.weight": good_map[names[0]]}, "in no shard"),
        "weight_map_list": ([good_map], "weight_map"),
        "weight_map_empty": ({}, "weight_map"),
        "weight_map_missing": (None, "weight_map"),
        "not_json": ("{weight_map", "not a valid index"),
        "nested_deep": ("[" * 100_000, "nested deeper"),
        "array": ("[]", "found an array"),
        "surrogate_shard": ({n: BAD for n in names}, "surrogate"),
    }
    cases = []
    for name, (weight_map, expect) in variants.items():
        folder = root / "indexes" / name
        folder.mkdir(parents=True)
        shutil.copyfile(root / "good" / "model" / "config.json", folder / "config.json")
        os.link(root / "good" / "model" / "model.safetensors", folder / "model-00001-of-00001.safetensors")
        if isinstance(weight_map, str):
            text = weight_map
        else:
            text = json.dumps({"metadata": {}} if weight_map is None else {"metadata": {}, "weight_map": weight_map})
        (folder / "model.safetensors.index.json").write_text(text, encoding="utf-8")
        if name == "shard_is_folder":
            (folder / "folder.safetensors").mkdir()
        if name == "symlink_escape":
            (folder / "linked.safetensors").symlink_to(outside / "weights.safetensors")
        d = f"indexes/{name}"
        index = f"{d}/model.safetensors.index.json"
        cases.append(Case("index", name, index, (
            ("plan", "--model", index), ("plan", "--model", d), _train(d), _generate(d),
            ("convert", d, "out/converted.safetensors", "--device", "cpu"), _merge(d), _bench(d)), expect))
    return cases


# -- training data ----------------------------------------------------------------------------


def data_cases(root: Path) -> list[Case]:
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}] * 42
    variants: dict[str, tuple[str | bytes, str]] = {
        "nested_deep.jsonl": ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "line 1: JSON nested deeper"),
        "nested_deep_line3.jsonl": ('{"text": "a"}\n{"text": "b"}\n' + "[" * 50_000 + "\n", "line 3"),
        "surrogate_text.jsonl": ('{"text": "' + "\\ud800" + '"}\n', 'field "text" holds an unpaired'),
        "surrogate_prompt.jsonl": ('{"prompt": "\\udfff", "completion": "x"}\n', "surrogate"),
        "surrogate_key.jsonl": ('{"text": "ok", "\\ud800": 1}\n', "surrogate"),
        "huge_integer.jsonl": ('{"text": "a", "n": ' + "7" * 5000 + "}\n", "out of range"),
        # A JSON array is data (issue 17): its bad items are named by position and line.
        "alpaca_array_bad_item.json": (json.dumps(rows[:5] + [{"instruction": "x"}] + rows[5:], indent=2),
                                       'item 6 \\(line 27\\): missing field "output"'),
        "array_one_line.jsonl": (json.dumps([{"text": "a"}, {"txt": "b"}]), 'item 2 \\(line 1\\): missing field "text"'),
        "pretty_object.json": (json.dumps({"text": "a long text"}, indent=2), "one JSON object spread over"),
        "array_of_strings.json": (json.dumps(["a", "b", "c"]), "item 1 \\(line 1\\): expected a JSON object"),
        "long_line.txt": ("short line\n" + "x" * (50 * 1024 * 1024) + "\nend\n", "line 2: 52,428,800 bytes"),
        "long_line.jsonl": ('{"text": "ok"}\n{"text": "' + "y" * (2 * 1024 * 1024) + '"}\n', "line 2: .* bytes"),
        "text_null.jsonl": ('{"text": null}\n', "must be a string"),
        "text_number.jsonl": ('{"text": 5}\n', "must be a string"),
        "text_nan.jsonl": ('{"text": NaN}\n', "must be a string"),
        "no_fields.jsonl": ('{"title": "x"}\n', 'missing field "text"'),
        "mixed_kinds.jsonl": ('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', 'missing field "text"'),
        "completion_empty.jsonl": ('{"prompt": "p", "completion": "  "}\n', '"completion" is empty'),
        "completion_list.jsonl": ('{"prompt": "p", "completion": ["c"]}\n', "must be a string"),
        "line_is_number.jsonl": ("5\n", "expected a JSON object"),
        "line_is_list.jsonl": ('[{"text": "a"}]\n{"text": "b"}\n', "line 1: expected a JSON object"),
        "not_json.jsonl": ("{text: a}\n", "invalid JSON"),
        "empty.jsonl": ("", "empty"),
        "blank_lines.txt": ("\n\n   \n\t\n", "empty"),
        "bom_only.txt": ("\ufeff", "empty"),
        "not_utf8.txt": (b"caf\xe9\n", "not valid UTF-8"),
        "utf16.txt": ("hello".encode("utf-16"), "not valid UTF-8"),
        "encoded_surrogate.txt": (b"a\xed\xa0\x80b\n", "not valid UTF-8"),
        "many_bad_lines.jsonl": ("".join(f"{{bad {i}\n" for i in range(40)), "40 bad lines"),
    }
    cases = []
    folder = root / "data"
    folder.mkdir()
    for name, (content, expect) in variants.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        cases.append(Case("data", name, f"data/{name}", (_train("good/model", f"data/{name}"),), expect))
    (folder / "a_folder.txt").mkdir()
    cases.append(Case("data", "a_folder", "data/a_folder.txt", (_train("good/model", "data/a_folder.txt"),),
                      "no data files in the folder"))  # a folder of data files is data (issue 17)
    cases.append(Case("data", "small_limit", "good/data.txt",
                      (_train("good/model", "good/data.txt", "out/train", "--max-line-size", "64"),), "64 B limit"))
    return cases


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_cases(root: Path) -> list[Case]:
    good = root / "good" / "run"
    state = json.loads((good / "checkpoint-1" / "trainer_state.json").read_text())
    adapter = json.loads((good / "checkpoint-1" / "adapter_config.json").read_text())
    opt_raw = (good / "checkpoint-1" / "optimizer.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", opt_raw[:8])
    opt_header = json.loads(opt_raw[8:8 + n])
    opt_meta = json.loads(opt_header["__metadata__"]["optimizer"])

    def optimizer_with(meta: Any) -> bytes:
        text = meta if isinstance(meta, str) else json.dumps(meta)
        return _safetensors({**opt_header, "__metadata__": {"format": "pt", "optimizer": text}}, opt_raw[8 + n:])

    group = opt_meta["param_groups"][0]
    trainer = {  # trainer_state.json: read by `lema train --resume` only
        "global_step_huge": ({**state, "global_step": 2**70}, "global_step"),
        "micro_step_string": ({**state, "micro_step": "0"}, "micro_step"),
        "micro_step_negative": ({**state, "micro_step": -3}, "micro_step"),
        "rng_list": ({**state, "rng": [1, 2]}, "rng="),
        "rng_torch_number": ({**state, "rng": {**state["rng"], "torch": 5}}, "rng.torch"),
        "rng_torch_garbage": ({**state, "rng": {**state["rng"], "torch": "QUJD"}}, "RNG state is malformed"),
        "rng_python_short": ({**state, "rng": {**state["rng"], "python": [3]}}, "rng.python"),
        "scheduler_string": ({**state, "scheduler": "cosine"}, "scheduler="),
        "scheduler_field_type": ({**state, "scheduler": {"last_epoch": "x"}}, "last_epoch"),
        "scheduler_unknown_field": ({**state, "scheduler": {"step": 1}}, "unknown fields"),
        "config_list": ({**state, "config": [1]}, "config="),
        "config_rank_string": ({**state, "config": {**state["config"], "lora_rank": "4"}}, "lora_rank"),
        "config_targets_number": ({**state, "config": {**state["config"], "lora_target_modules": 5}},
                                  "lora_target_modules"),
        "config_unknown_field": ({**state, "config": {**state["config"], "learning_rate": 1}}, "unknown LemaConfig"),
        "config_seed_huge": ({**state, "config": {**state["config"], "seed": 2**70}}, "seed"),
        "state_deep": ("[" * 100_000, "no usable checkpoint.*nested deeper"),
        "state_array": ("[]", "no usable checkpoint.*found an array"),
        "state_not_json": ("{global_step: 1", "no usable checkpoint.*not a valid"),
        "state_step_string": ({**state, "global_step": "1"}, "global_step"),
    }
    optimizer = {  # optimizer.safetensors: read by `lema train --resume` only
        "opt_meta_not_json": (optimizer_with("{oops"), "optimizer metadata is not valid"),
        "opt_meta_deep": (optimizer_with("[" * 10_000), "nested deeper"),
        "opt_meta_list": (optimizer_with([1]), "must be a JSON object"),
        "opt_names_number": (optimizer_with({**opt_meta, "param_names": 5}), "param_names"),
        "opt_groups_string": (optimizer_with({**opt_meta, "param_groups": "x"}), "param_groups"),
        "opt_lr_string": (optimizer_with({**opt_meta, "param_groups": [{**group, "hyper": {
            "__dict__": [[k, ("x" if k == "lr" else v)] for k, v in group["hyper"]["__dict__"]]}}]}), "lr="),
        "opt_tensor_key_list": (optimizer_with({**opt_meta, "state": {
            k: {"__dict__": [[a, {"__tensor__": [1]} if a == "exp_avg" else b] for a, b in v["__dict__"]]}
            for k, v in opt_meta["state"].items()}}), "optimizer state"),
        "opt_not_safetensors": (b"not a safetensors file", "not a readable safetensors"),
    }
    adapter_variants = {  # adapter_config.json / adapter_model.safetensors: read by every command
        "adapter_rank_string": ({**adapter, "r": "4"}, "r='4'|rank"),
        "adapter_rank_huge": ({**adapter, "r": 10**9}, "more than 65,536|rank"),
        "adapter_alpha_string": ({**adapter, "lora_alpha": "8"}, "alpha"),
        "adapter_targets_number": ({**adapter, "target_modules": 5}, "target_modules"),
        "adapter_rslora_string": ({**adapter, "use_rslora": "yes"}, "use_rslora"),
        "adapter_dropout_string": ({**adapter, "lora_dropout": "0.1"}, "dropout"),
        "adapter_peft_type": ({**adapter, "peft_type": "PREFIX_TUNING"}, "peft_type"),
        "adapter_config_deep": ("[" * 100_000, "nested deeper"),
        "adapter_config_list": ("[]", "found an array"),
        "adapter_weights_empty": (b"", "not a readable safetensors|too short"),
        "adapter_weights_garbage": (b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}", "not a readable safetensors"),
    }
    # lema merge takes the rank from the tensors and merges every LoRA pair they hold: it
    # never reads these fields.
    merge_ignores = {"adapter_rank_string", "adapter_rank_huge", "adapter_targets_number", "adapter_dropout_string"}
    cases = []
    for name, (value, expect) in {**trainer, **optimizer, **adapter_variants}.items():
        run = root / "ckpts" / name
        shutil.copytree(good, run)
        ckpt = run / "checkpoint-1"
        if name in trainer:
            target = ckpt / "trainer_state.json"
        elif name in optimizer:
            target = ckpt / "optimizer.safetensors"
        elif name.startswith("adapter_weights"):
            target = ckpt / "adapter_model.safetensors"
        else:
            target = ckpt / "adapter_config.json"
        if isinstance(value, bytes):
            target.write_bytes(value)
        else:
            target.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
        rel = f"ckpts/{name}"
        commands = [_train("good/model", "good/data.txt", rel, "--resume", "--steps", "2")]
        if name in adapter_variants:
            commands.append(_generate("good/model", "--adapter", f"{rel}/checkpoint-1"))
        if name in adapter_variants and name not in merge_ignores:
            commands.append(_merge("good/mono.safetensors", f"{rel}/checkpoint-1"))
        cases.append(Case("checkpoint", name, str(target.relative_to(root)), tuple(commands), expect))
    cases.append(Case("checkpoint", "disk_full", "good/run", (_train("good/model", "good/data.txt", "out/full"),),
                      "could not write the checkpoint", fsize=16 * 1024))
    cases.append(Case("checkpoint", "disk_full_merge", "good/run", (_merge("good/mono.safetensors"),),
                      "file too large|disk space", fsize=16 * 1024))
    return cases


# -- options of every command -----------------------------------------------------------------


def option_cases(root: Path) -> list[Case]:
    (root / "a_file").write_text("x", encoding="utf-8")
    huge = str(2**70)
    commands = {
        "train_seed_huge": (_train("good/model", "good/data.txt", "out/t", "--seed", huge), "--seed"),
        "generate_seed_huge": (_generate("good/model", "--seed", huge, "--sample"), "--seed"),
        "demo_seed_huge": (("demo", "--seed", huge, "--out", "out/demo"), "--seed"),
        "demo_out_is_file": (("demo", "--out", "a_file", "--size", "tiny", "--steps", "1"), "is a file"),
        "generate_prompt_surrogate": (("generate", "--model", "good/model", "--prompt", "a" + "\udcff",
                                       "--device", "cpu"), "--prompt"),
        "generate_temperature_zero": (_generate("good/model", "--temperature", "0"), "temperature=0.0"),
        "generate_top_p_nan": (_generate("good/model", "--top-p", "nan"), "top_p=nan"),
        "generate_prompt_over_context": (_generate("good/model", "--prompt", "word " * 600), "context is 512"),
        "train_lr_nan": (_train("good/model", "good/data.txt", "out/t", "--lr", "nan"), "--lr"),
        "train_alpha_negative": (_train("good/model", "good/data.txt", "out/t", "--alpha", "-1"), "lora_alpha"),
        "train_rank_huge": (_train("good/model", "good/data.txt", "out/t", "--rank", str(10**9)), "rank"),
        "train_targets_empty": (_train("good/model", "good/data.txt", "out/t", "--targets", ",,"),
                                "lora_target_modules"),
        "train_max_line_size_bad": (_train("good/model", "good/data.txt", "out/t", "--max-line-size", "lots"),
                                    "--max-line-size"),
        "train_seed_not_int": (_train("good/model", "good/data.txt", "out/t", "--seed", "x"), "--seed.*--help"),
        "plan_vram_negative": (("plan", "--model", "llama-2-7b", "--vram", "-1G"), "--vram"),
        "plan_seq_zero": (("plan", "--model", "llama-2-7b", "--seq", "0"), "seq=0"),
        "plan_rank_string": (("plan", "--model", "llama-2-7b", "--rank", "x"), "--rank"),
        "plan_bandwidth_bad": (("plan", "--model", "llama-2-7b", "--bandwidth", "fast"), "--bandwidth"),
        "plan_no_model": (("plan",), "--model is required"),
        "plan_unknown_model": (("plan", "--model", "no/such-model-here.json"), "no such"),
        "convert_out_is_folder": (("convert", "good/model", "good"), "is a directory"),
        "convert_no_model": (("convert", "no_such_folder", "out/x.safetensors"), "not a local folder"),
        "convert_device_bad": (("convert", "good/model", "out/x.safetensors", "--device", "tpu9"), "device"),
        "merge_no_adapter": (_merge("good/mono.safetensors", "no_such_adapter"), "no such checkpoint"),
        "bench_device_bad": (("bench", "--device", "tpu"), "--device"),
        "bench_strategy_bad": (("bench", "--strategies", "fastest"), "strategy"),
        "bench_model_missing": (("bench", "--model", "no_such_folder"), "not a folder"),
        "bench_workdir_is_file": (("bench", "--workdir", "a_file"), "is a file"),
        "unknown_command": (("frobnicate",), "no such command"),
    }
    return [Case("option", name, "", (argv,), expect) for name, (argv, expect) in commands.items()]


def build_corpus(root: Path) -> list[Case]:
    """Write the good inputs and every bad one under ``root``; return the cases."""
    from tests.hostile_corpus import hostile_cases

    build_good(root)
    (root / "out").mkdir()
    return [*header_cases(root), *config_cases(root), *index_cases(root), *data_cases(root),
            *checkpoint_cases(root), *option_cases(root), *hostile_cases(root)]


def corpus_files(cases: list[Case]) -> set[str]:
    """The distinct bad files of the cases (bad options have none)."""
    return {c.path for c in cases if c.path and not c.path.startswith("good/")}
