"""``lema plan`` on the built-in configs of today's families: in-process, under 2 s each (the
405B too), with the experts' bytes and routed activations of the mixtures of experts counted."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from lema.cli import main

BUILTINS = {  # name -> (family, parameters transformers counts for the published config)
    "qwen3-8b": ("qwen3", 8_190_735_360), "qwen3-32b": ("qwen3", 32_762_123_264),
    "gemma-2-9b": ("gemma2", 9_241_705_984), "gemma-3-12b": ("gemma3", 11_766_034_176),
    "phi-3-mini": ("phi3", 3_821_079_552), "mixtral-8x7b": ("mixtral", 46_702_792_704),
    "qwen3-30b-a3b": ("qwen3_moe", 30_532_122_624), "llama-3.1-70b": ("llama", 70_553_706_496),
    "llama-3.1-405b": ("llama", 405_853_388_800),
}


def _parts(item: dict) -> list[dict]:
    return [item] + [p for part in item.get("parts", []) for p in _parts(part)]


@pytest.mark.parametrize("name", list(BUILTINS))
def test_plan_of_a_builtin_answers_within_two_seconds(name):
    family, parameters = BUILTINS[name]
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["plan", "--model", name, "--vram", "24G", "--seq", "2048", "--json"])
    elapsed = time.perf_counter() - start
    assert result.exit_code in (0, 1), result.output
    data = json.loads(result.stdout)
    assert (data["model"]["family"], data["model"]["parameters"]) == (family, parameters)
    assert elapsed < 2.0, elapsed
    names = {p["name"] for item in data["device"]["items"] for p in _parts(item)}
    assert ("experts" in names) == (family in ("mixtral", "qwen3_moe"))  # routed activations
    assert ("eager_scores" in names) == (family == "gemma2")


def test_the_experts_bytes_are_in_the_layers():
    data = json.loads(CliRunner().invoke(main, ["plan", "--model", "mixtral-8x7b", "--json"]).stdout)
    experts = 8 * 3 * 4096 * 14336 * 2  # 8 SwiGLU experts per layer, bf16
    assert experts < data["model"]["largest_layer_bytes"] < experts * 1.1
    assert data["model"]["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_plan_of_the_405b_never_imports_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom lema.cli import main\n"
            "r = CliRunner().invoke(main, ['plan', '--model', 'llama-3.1-405b', '--vram', '80G'])\n"
            "print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False"
