"""No silent wrong model: every command that reads a model refuses a tensor its family's math
does not use, and a config option LEMA does not implement, with exit 2 and one line naming it.

The extra tensor is the issue's case: an ``o_proj`` bias in a file whose config says there is
none (transformers would load it only with ``attention_bias``). The option is a rope type
transformers ships but LEMA does not implement. Nothing is written by the commands that write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lema import LemaConfig, LemaModel
from lema.cli import main
from tests.demo_models import tiny_llama_folder, write_data

EXTRA = "model.layers.0.self_attn.o_proj.bias"
OPTION = {"rope_parameters": {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}}
COMMANDS = ("plan", "convert", "train", "generate", "merge")


def _variant(good: Path, folder: Path, kind: str) -> Path:
    """A copy of the model folder with one extra tensor, or one unimplemented config option."""
    folder.mkdir()
    for f in good.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((good / "config.json").read_text())
    tensors = load_file(str(good / "model.safetensors"))
    if kind == "tensor":
        tensors[EXTRA] = torch.zeros(config["hidden_size"])
    else:
        config.update(OPTION)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    good = tiny_llama_folder(root / "good")
    model = LemaModel(LemaConfig(gbi_path=str(good / "model.safetensors"), device="cpu", lora_rank=2))
    model.initialize_lora()
    model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.0)).save_checkpoint(root / "adapter")
    model.close()
    return {"root": root, "adapter": root / "adapter", "data": write_data(root / "data")["txt"],
            "tensor": _variant(good, root / "tensor", "tensor"), "option": _variant(good, root / "option", "option")}


def _args(command: str, model: Path, inputs: dict, out: Path) -> list[str]:
    weights = str(model / "model.safetensors")
    if command == "plan":
        return ["plan", "--model", weights]
    if command == "convert":
        return ["convert", str(model), str(out)]
    if command == "train":
        return ["train", "--model", weights, "--data", str(inputs["data"]), "--out", str(out), "--steps", "1",
                "--seq", "16", "--batch", "1", "--device", "cpu"]
    if command == "generate":
        return ["generate", "--model", weights, "--prompt", "the", "--max-new-tokens", "2", "--device", "cpu"]
    return ["merge", "--base", str(model), "--adapter", str(inputs["adapter"]), "--out", str(out)]


@pytest.mark.parametrize("kind, named", [("tensor", EXTRA), ("option", "rope_type='proportional'")])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_with_one_line_naming_it(inputs, tmp_path, command, kind, named):
    out = tmp_path / ("out.safetensors" if command in ("convert", "merge") else "run")
    result = CliRunner().invoke(main, _args(command, inputs[kind], inputs, out))
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2, result.output
    # one error line, the last (train reports the data it read first)
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]) and named in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("kind, named", [("tensor", EXTRA), ("option", "rope_type='proportional'")])
def test_the_python_api_refuses_the_same_way(inputs, tmp_path, kind, named):
    from lema.app.tools.convert import prepare_monolithic_safetensors
    from lema.app.tools.merge import merge_adapter
    from lema.errors import ModelFormatError

    folder = inputs[kind]
    calls = [lambda: LemaModel(LemaConfig(gbi_path=str(folder / "model.safetensors"), device="cpu")),
             lambda: prepare_monolithic_safetensors(folder, tmp_path / "out.safetensors", device="cpu"),
             lambda: merge_adapter(folder, inputs["adapter"], tmp_path / "merged.safetensors")]
    for call in calls:
        with pytest.raises(ModelFormatError, match=named.replace("(", r"\(").replace(".", r"\.")):
            call()
    assert not any(tmp_path.iterdir())
