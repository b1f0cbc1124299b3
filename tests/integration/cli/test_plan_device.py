"""``lema plan`` plans for the device that is there (``--device auto``) and says which; every
"does not fit" names the options beyond the run's shape that would change the verdict."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lema.adapters.weights.builtin_models import builtin_config
from lema.cli import main
from tests.sparse_models import write_sparse_safetensors

SMALL = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
         "num_hidden_layers": 4, "intermediate_size": 512, "vocab_size": 2048, "max_position_embeddings": 1024}


def plan(*args: str, gpu: bool = False):
    # CUDA_VISIBLE_DEVICES="" hides any GPU from the probe: the CPU-only machine of the issue
    env = {} if gpu else {"CUDA_VISIBLE_DEVICES": ""}
    return CliRunner(env=env).invoke(main, ["plan", *args])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return str(write_sparse_safetensors(tmp_path_factory.mktemp("m") / "small.safetensors", SMALL, "F32"))


def test_on_a_cpu_only_machine_plan_plans_for_the_cpu_and_says_so(small):
    result = plan("--model", small, "--vram", "64M", "--seq", "256", "--batch", "4")
    assert result.exit_code == 0, result.output
    assert "device: cpu (no GPU visible; --device auto" in result.output
    assert "FITS: " in result.output and "runtime_reserve" in result.output
    data = json.loads(plan("--model", small, "--vram", "64M", "--seq", "256", "--batch", "4", "--json").stdout)
    assert data["shape"]["device_kind"] == "cpu" and data["shape"]["reserve_bytes"] == 0 and data["fits"]
    assert data["device_choice"].startswith("cpu (no GPU visible")
    # the same run planned for a GPU counts the CUDA reserve and does not fit; the verdict names --device cpu
    cuda = plan("--model", small, "--vram", "64M", "--seq", "256", "--batch", "4", "--device", "cuda")
    assert cuda.exit_code == 1
    assert "device: cuda (--device cuda)" in cuda.output
    verdict = cuda.output.strip().splitlines()[-1]
    assert verdict.startswith("Error: DOES NOT FIT") and "--device cpu" in verdict and "--reserve " in verdict


def test_the_reserve_named_in_the_verdict_fits_and_one_mib_more_does_not(small):
    args = ["--model", small, "--vram", "300M", "--seq", "256", "--batch", "4", "--device", "cuda"]
    out = plan(*args)
    assert out.exit_code == 1
    reserve = out.output.split("--reserve ")[1].split()[0]
    mib = int(reserve.removesuffix("M"))
    assert 0 < mib < 512
    assert plan(*args, "--reserve", f"{mib}M").exit_code == 0
    assert plan(*args, "--reserve", f"{mib + 1}M").exit_code == 1


def test_quantize_is_named_when_4_bit_weights_fit(tmp_path):
    model = str(write_sparse_safetensors(tmp_path / "70b.safetensors", builtin_config("llama-2-70b"), "F16"))
    args = ["--model", model, "--vram", "8G", "--device", "cuda"]
    out = plan(*args)
    assert out.exit_code == 1 and "--quantize nf4" in out.output.strip().splitlines()[-1]
    assert plan(*args, "--quantize", "nf4").exit_code == 0


def test_device_auto_is_the_default_of_every_command_with_a_device():
    for command in ("plan", "train", "generate", "convert", "bench"):
        out = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
        line = next(line for line in out.output.splitlines() if "--device" in line)
        rest = out.output.split("--device", 1)[1].split("\n  -", 1)[0]
        assert "[default: auto]" in " ".join(rest.split()), (command, line)


def test_train_says_which_device_auto_chose(tmp_path):
    from tests.demo_models import tiny_llama_folder, write_data

    model = tiny_llama_folder(tmp_path / "m")
    data = write_data(tmp_path / "d")
    result = CliRunner(env={"CUDA_VISIBLE_DEVICES": ""}).invoke(
        main, ["train", "--model", str(model), "--data", str(data["pc"]), "--out", str(tmp_path / "o"), "--steps", "1",
               "--batch", "2", "--seq", "48", "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert "plan: streaming on cpu (--device auto: no GPU available" in result.output


def test_when_nothing_fits_the_options_tried_are_named(tmp_path):
    model = str(write_sparse_safetensors(tmp_path / "7b.safetensors", builtin_config("llama-2-7b"), "F16"))
    out = plan("--model", model, "--vram", "64M", "--device", "cuda")
    assert out.exit_code == 1
    assert "nor with --device cpu or --reserve 0 or --quantize nf4: use a larger device" in out.output
