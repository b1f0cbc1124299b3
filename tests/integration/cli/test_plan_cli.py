"""``lema plan`` end to end with CliRunner, on sparse model files (headers only, no disk)."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from lema.adapters.weights.builtin_models import builtin_config, builtin_names
from lema.cli import main
from tests.sparse_models import write_sparse_safetensors, write_sparse_sharded

MODELS = {  # file name -> (built-in config, dtype)
    "llama-2-7b": ("llama-2-7b", "F16"), "llama-3-8b": ("llama-3-8b", "BF16"), "mistral-7b": ("mistral-7b", "BF16"),
    "tinyllama": ("tinyllama-1.1b", "BF16"), "llama-2-70b": ("llama-2-70b", "F16"), "gpt2": ("gpt2", "F32"),
}


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sparse")
    return {name: write_sparse_safetensors(folder / f"{name}.safetensors", builtin_config(cfg), dtype)
            for name, (cfg, dtype) in MODELS.items()}


def run(*args: str):
    # These tests plan for a GPU whatever this machine has (the default, --device auto, is tested below).
    device = [] if "--device" in args else ["--device", "cuda"]
    return CliRunner().invoke(main, ["plan", *args, *device])


def plan_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_llama_2_7b_numbers_from_json(sparse):
    data = plan_json("--model", str(sparse["llama-2-7b"]), "--vram", "8G")
    model = data["model"]
    assert model["parameters"] == 6_738_415_616
    assert model["weight_bytes"] == 13_476_831_232
    assert model["largest_layer_bytes"] == 404_766_720
    assert (model["family"], model["n_layers"], model["hidden_size"]) == ("llama", 32, 4096)
    assert data["fits"] is True and data["budget_bytes"] == 8 * 1024**3
    assert data["headroom_bytes"] == data["budget_bytes"] - data["device"]["total_bytes"]
    assert data["device"]["total_bytes"] == sum(i["bytes"] for i in data["device"]["items"])
    assert data["host"]["total_bytes"] == sum(i["bytes"] for i in data["host"]["items"])
    assert data["transfer_bytes_per_step"] > model["weight_bytes"]
    assert data["source"]["kind"] == "safetensors" and data["recommendations"]


@pytest.mark.parametrize("name, params", [("llama-3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096),
                                          ("tinyllama", 1_100_048_384), ("gpt2", 124_439_808),
                                          ("llama-2-70b", 68_976_648_192)])
def test_parameter_counts_of_the_known_models(sparse, name, params):
    assert plan_json("--model", str(sparse[name]))["model"]["parameters"] == params


def test_human_output_has_the_table_link_and_verdict(sparse):
    result = run("--model", str(sparse["tinyllama"]), "--vram", "8G")
    assert result.exit_code == 0, result.output
    for text in ("weight_slots", "activation_peak", "staging_buffers", "host -> device per step", "FITS: ",
                 "headroom", "largest batch that fits"):
        assert text in result.output


def test_nproc_shows_per_rank_device_memory_and_the_host_memory_of_all_ranks(sparse):
    model = str(sparse["llama-2-7b"])
    one = plan_json("--model", model, "--vram", "24G", "--strategy", "resident")
    two = plan_json("--model", model, "--vram", "24G", "--strategy", "resident", "--nproc", "2")
    assert two["shape"]["local_ranks"] == 2 and two["device"] == one["device"]
    assert two["host"]["total_bytes"] == one["host"]["total_bytes"]  # one shared copy of the weights
    streaming = plan_json("--model", model, "--vram", "24G", "--nproc", "2")
    staging = {i["name"]: i["bytes"] for i in streaming["host"]["items"]}["staging_buffers"]
    assert staging == 2 * 4 * 404_766_720  # a staging ring per rank (3 slots and a spare)
    result = run("--model", model, "--vram", "24G", "--strategy", "resident", "--nproc", "2", "--ram", "16G")
    assert result.exit_code == 0, result.output
    assert "data parallel: 2 ranks on this machine" in result.output and "global batch 2" in result.output
    assert "device/rank" in result.output and "host (2 ranks)" in result.output
    assert "one copy shared by 2 ranks" in result.output
    assert run("--model", model, "--nproc", "0").exit_code == 2


def test_70b_at_8g_exits_1_with_what_would_fit(sparse):
    result = run("--model", str(sparse["llama-2-70b"]), "--vram", "8G")
    assert result.exit_code == 1
    assert ("Error: DOES NOT FIT: needs 9.1 GiB, budget 8.0 GiB; would fit with --prefetch 1 or "
            "--quantize nf4") in result.output
    assert "Traceback" not in result.output
    data = plan_json("--model", str(sparse["llama-2-70b"]), "--vram", "8G")
    assert data["fits"] is False and data["headroom_bytes"] < 0 and data["recommendations"]


def test_sharded_folder_index_and_bare_config(tmp_path):
    config = builtin_config("tinyllama-1.1b")
    index = write_sparse_sharded(tmp_path / "hf", config, "BF16", shards=3)
    expected = 1_100_048_384
    for ref, kind in ((index, "sharded"), (index.parent, "sharded"), (index.parent / "config.json", "config")):
        data = plan_json("--model", str(ref), "--vram", "8G")
        assert data["model"]["parameters"] == expected and data["source"]["kind"] == kind


def test_hf_folder_with_single_file_and_config_beside(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    config = builtin_config("gpt2")
    write_sparse_safetensors(folder / "model.safetensors", config, "F32", config_in_metadata=False)
    (folder / "config.json").write_text(json.dumps(config))
    assert plan_json("--model", str(folder))["model"]["parameters"] == 124_439_808


def test_folder_with_only_bin_weights_plans_from_config_and_says_convert(tmp_path):
    folder = tmp_path / "binonly"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(builtin_config("gpt2")))
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    result = run("--model", str(folder), "--vram", "8G")
    assert result.exit_code == 0, result.output
    assert "lema convert" in result.output


def test_builtin_names_and_hub_ids(tmp_path):
    for ref in ("llama-2-70b", "LLAMA-2-70B", "meta-llama/Llama-2-70b-hf", "NousResearch/Llama-2-70b-hf"):
        assert plan_json("--model", ref)["model"]["parameters"] == 68_976_648_192


def test_list_models():
    result = CliRunner().invoke(main, ["plan", "--list-models"])
    assert result.exit_code == 0
    for name in builtin_names():
        assert name in result.output
    rows = json.loads(CliRunner().invoke(main, ["plan", "--list-models", "--json"]).stdout)
    assert {r["name"] for r in rows} == set(builtin_names())


def test_json_shape(sparse):
    data = plan_json("--model", str(sparse["gpt2"]), "--vram", "4G", "--ram", "16G")
    for key in ("model", "device", "host", "budget_bytes", "fits", "headroom_bytes", "transfer_bytes_per_step",
                "recommendations", "link", "shape", "resident_units", "slot_count", "slot_bytes"):
        assert key in data
    assert set(data["model"]) >= {"family", "n_layers", "hidden_size", "parameters", "weight_bytes",
                                  "largest_layer_bytes"}
    assert all(set(i) >= {"name", "bytes"} for i in data["device"]["items"] + data["host"]["items"])
    assert data["host_budget_bytes"] == 16 * 1024**3
    assert data["link"]["time_floor_s"] == pytest.approx(data["transfer_bytes_per_step"] / (24 * 1024**3))


def test_options_change_the_plan(sparse):
    base = plan_json("--model", str(sparse["llama-2-7b"]))
    bigger = plan_json("--model", str(sparse["llama-2-7b"]), "--batch", "4", "--seq", "1024", "--rank", "64",
                       "--targets", "q_proj,v_proj", "--strategy", "resident", "--prefetch", "1", "--dtype", "float32",
                       "--device", "cpu", "--no-checkpointing")
    assert bigger["shape"]["lora_targets"] == ["q_proj", "v_proj"]
    assert bigger["slot_count"] == 2 and bigger["shape"]["attention"] == "flash"
    assert bigger["model"]["largest_layer_bytes"] == 2 * base["model"]["largest_layer_bytes"]
    assert bigger["host"]["total_bytes"] == 2 * base["model"]["weight_bytes"]


def _header_file(path: Path, header: bytes, total: int | None = None) -> Path:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        if total is not None:
            f.truncate(total)
    return path


def _corrupt_inputs(tmp: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, expected words in the one-line error)."""
    cfg = builtin_config("tinyllama-1.1b")
    meta = {"config": json.dumps(cfg)}
    (tmp / "empty.safetensors").write_bytes(b"")
    (tmp / "random.safetensors").write_bytes(os.urandom(4096))
    _header_file(tmp / "long.safetensors", b"{}")
    with open(tmp / "long.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 10**9))
    _header_file(tmp / "badjson.safetensors", b"{not json" + b" " * 7)
    past = json.dumps({"__metadata__": meta, "w": {"dtype": "F16", "shape": [1024, 1024],
                                                   "data_offsets": [0, 2 * 1024 * 1024]}}).encode()
    _header_file(tmp / "past.safetensors", past, total=100 + len(past))
    foo = json.dumps({"__metadata__": meta, "foo": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
                      "bar": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]}}).encode()
    _header_file(tmp / "foobar.safetensors", foo, total=8 + len(foo) + 12)
    return {
        "empty": (str(tmp / "empty.safetensors"), "too short"),
        "random": (str(tmp / "random.safetensors"), "not a valid safetensors file"),
        "header_too_long": (str(tmp / "long.safetensors"), "larger than the file"),
        "bad_json": (str(tmp / "badjson.safetensors"), "not valid JSON"),
        "past_end": (str(tmp / "past.safetensors"), "runs past the end of the file"),
        "no_layers": (str(tmp / "foobar.safetensors"), "no recognisable llama decoder layers"),
        "missing": (str(tmp / "nope" / "model.safetensors"), "no such file"),
        "missing_json": (str(tmp / "nope.json"), "no such file"),
    }


@pytest.mark.parametrize("case", ["empty", "random", "header_too_long", "bad_json", "past_end", "no_layers",
                                  "missing", "missing_json"])
def test_corrupt_inputs_exit_2_with_one_error_line(tmp_path, case):
    path, words = _corrupt_inputs(tmp_path)[case]
    result = run("--model", path, "--vram", "8G")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert "Traceback" not in result.output


class _Plant:
    """Unpickling this would create a marker file (if anything ever unpickled it)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_pickle_files_are_refused_and_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(pickle.dumps(_Plant(str(marker))))
    result = run("--model", str(path), "--vram", "8G")
    assert result.exit_code == 2
    assert "lema convert" in result.output and "Error:" in result.output
    assert not marker.exists()


@pytest.mark.parametrize("vram", ["0", "-1", "nan", "", "lots", "inf", "8X"])
def test_bad_vram_exits_2_naming_the_option(vram):
    result = run("--model", "gpt2", "--vram", vram)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--vram" in errors[0], result.output


@pytest.mark.parametrize("args, words", [
    (["--model", "gpt2", "--targets", "q_proj"], "match no module"),
    (["--model", "gpt2", "--strategy", "lazy"], "strategy"),
    (["--model", "gpt2", "--batch", "0"], "batch=0"),
    (["--model", "gpt2", "--dtype", "float8"], "dtype"),
    (["--model", "gpt2", "--ram", "8G"], "--vram"),
    (["--vram", "8G"], "--model is required"),
    (["--model", "gpt2", "--config", "/nonexistent/config.json"], "no such config file"),
])
def test_bad_options_exit_2_with_one_error_line(args, words):
    result = run(*args)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.output


def test_unknown_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("--model", "someone/not-a-real-model-xyz")
    assert result.exit_code == 2
    assert "network is off" in result.output


@pytest.mark.parametrize("model, vram, seq", [("llama-2-7b", "8G", "32768"), ("llama-3.1-8b", "24G", "65536")])
def test_long_context_fits_with_activation_offload_and_tiles(model, vram, seq):
    """Issue 14's must-show: 7B at 32k tokens on 8 GiB, 8B at 64k tokens on 24 GiB, items shown."""
    result = run("--model", model, "--vram", vram, "--seq", seq)
    assert result.exit_code == 0, result.output
    for text in ("FITS: ", "activation offload", "-position tiles", "offloaded_inputs", "30 layer inputs x T h a, pinned",
                 "of layer inputs host -> device", "device -> host per step", "activation offload is on",
                 "sequence tiling is on"):
        assert text in result.output, text
    data = plan_json("--model", model, "--vram", vram, "--seq", seq)
    assert data["fits"] and data["shape"]["offload_activations"] is True and data["shape"]["tile_tokens"] > 0
    host = {i["name"]: i["bytes"] for i in data["host"]["items"]}
    assert host["offloaded_inputs"] == data["activation_bytes_per_step"] == 30 * int(seq) * 4096 * 2
    assert data["link_bytes_per_step"] == data["transfer_bytes_per_step"] + 2 * data["activation_bytes_per_step"]
    phases = {p["name"]: p for p in next(i for i in data["device"]["items"] if i["name"] == "activation_peak")["parts"]}
    assert set(phases) == {"forward", "head", "layer_backward", "optimizer_step"}


def test_no_offload_activations_says_offload_would_fit():
    result = run("--model", "llama-2-7b", "--vram", "8G", "--seq", "32768", "--no-offload-activations")
    assert result.exit_code == 1
    assert "would fit with" in result.output and "--offload-activations" in result.output
    assert "offloaded_inputs" not in result.output


def test_offload_activations_needs_training_with_checkpointing():
    for extra in (("--mode", "inference"), ("--no-checkpointing",)):
        result = run("--model", "llama-2-7b", "--offload-activations", *extra)
        assert result.exit_code == 2 and result.output.startswith("Error: ") and "offload_activations" in result.output


def test_the_cpu_without_a_budget_is_planned_with_its_weights_in_place(sparse):
    # as `lema train --device cpu` runs it without --vram: no weight slots, no staging, no link bytes
    free = plan_json("--model", str(sparse["llama-2-7b"]), "--device", "cpu")
    items = {i["name"]: i["bytes"] for i in free["device"]["items"]}
    assert items["weight_slots"] == items["resident_weights"] == 0 and free["transfer_bytes_per_step"] == 0
    # with a budget the CPU stands in for a smaller device: weights through slots
    budgeted = plan_json("--model", str(sparse["llama-2-7b"]), "--device", "cpu", "--vram", "64G")
    slots = {i["name"]: i["bytes"] for i in budgeted["device"]["items"]}["weight_slots"]
    assert slots == budgeted["slot_count"] * budgeted["slot_bytes"] > 0
    assert budgeted["device"]["total_bytes"] - free["device"]["total_bytes"] == slots
