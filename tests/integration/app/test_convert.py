"""Conversion to one monolithic .safetensors file (prepare_monolithic_safetensors, lema convert)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lema.adapters.weights.hub import iter_checkpoint_tensors, resolve_model
from lema.adapters.weights.safetensors_header import read_header
from lema.cli import main
from lema.domain.families import registry as arch
from lema.domain.model.spec import ModelSpec
from lema.errors import ConfigError, ModelFormatError
from lema.utils.model_utils import prepare_monolithic_safetensors

transformers = pytest.importorskip("transformers")


def tiny_config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64)
    if family == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)


def save_tiny(family: str, folder: Path, form: str = "single", seed: int = 0):
    """Save a random tiny model as transformers would (single / sharded safetensors, .bin)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    if form == "single":
        model.save_pretrained(folder)
    elif form == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
    else:
        # transformers 5 always writes safetensors; write the legacy .bin layout ourselves.
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        state = model.state_dict()
        if form == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:  # bin_sharded
            names = list(state)
            halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                      "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
            weight_map = {}
            for file, part in halves.items():
                torch.save({n: state[n] for n in part}, folder / file)
                weight_map.update({n: file for n in part})
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model


def reference_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not arch.is_ignored(k)}


@pytest.mark.parametrize("form", ["single", "sharded", "bin", "bin_sharded"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_converted_file_holds_the_original_tensors_and_config(tmp_path, family, form):
    model = save_tiny(family, tmp_path / "src", form)
    seen = []
    out = prepare_monolithic_safetensors(tmp_path / "src", tmp_path / "model.safetensors", device="cpu",
                                         progress=lambda done, total, name: seen.append((done, total)))
    got = load_file(out)
    ref = reference_tensors(model)
    assert set(got) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor), name
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["config"]) == json.loads((tmp_path / "src" / "config.json").read_text())
    assert metadata["format"] == "pt" and metadata["lema_version"]
    header = read_header(out)
    spec = ModelSpec.from_header(header.tensors, json.loads(metadata["config"]))
    assert spec.n_layers == 2
    assert seen[-1] == (len(got), len(got))
    assert not list(tmp_path.glob(".model.safetensors*")), "temporary file left behind"


def test_tied_models_get_both_embedding_and_head_names(tmp_path):
    save_tiny("gpt2", tmp_path / "gpt2")
    save_tiny("qwen2", tmp_path / "qwen2")
    # transformers drops the tied head from the file it saves ...
    with safe_open(str(tmp_path / "gpt2" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    gpt2 = load_file(prepare_monolithic_safetensors(tmp_path / "gpt2", tmp_path / "g.safetensors"))
    qwen = load_file(prepare_monolithic_safetensors(tmp_path / "qwen2", tmp_path / "q.safetensors"))
    # ... the converted file has both, as separate (cloned) tensors.
    assert torch.equal(gpt2["lm_head.weight"], gpt2["transformer.wte.weight"])
    assert torch.equal(qwen["lm_head.weight"], qwen["model.embed_tokens.weight"])
    assert not any(k.endswith(".attn.bias") and ".c_attn" not in k for k in gpt2)


def test_head_only_source_gets_the_embedding_name_too(tmp_path):
    """safetensors.torch.save_model may keep lm_head.weight and drop the embedding name."""
    model = save_tiny("qwen2", tmp_path / "src")
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    (tmp_path / "src" / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    got = load_file(prepare_monolithic_safetensors(tmp_path / "src", tmp_path / "m.safetensors"))
    assert torch.equal(got["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(got["lm_head.weight"], model.model.embed_tokens.weight)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_conversion(tmp_path, dtype):
    model = save_tiny("llama", tmp_path / "src", "sharded")
    got = load_file(prepare_monolithic_safetensors(tmp_path / "src", tmp_path / "m.safetensors", dtype=dtype))
    want = getattr(torch, dtype)
    for name, tensor in reference_tensors(model).items():
        assert got[name].dtype == want
        assert torch.equal(got[name], tensor.to(want)), name


def test_untied_model_missing_its_head_is_refused_and_nothing_is_written(tmp_path):
    model = save_tiny("llama", tmp_path / "src")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="lm_head.weight"):
        prepare_monolithic_safetensors(tmp_path / "src", tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == ["src"]


def test_unknown_architecture_and_bad_dtype_are_refused(tmp_path):
    save_tiny("llama", tmp_path / "src")
    with pytest.raises(ConfigError, match="dtype"):
        prepare_monolithic_safetensors(tmp_path / "src", tmp_path / "m.safetensors", dtype="int3")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="bert"):
        prepare_monolithic_safetensors(tmp_path / "src", tmp_path / "m.safetensors")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_bin_is_refused_and_never_runs_code(tmp_path, zip_format):
    marker = tmp_path / "PWNED"
    model = save_tiny("llama", tmp_path / "src", "bin")
    state = dict(model.state_dict())
    state["model.norm.weight"] = _Evil(marker)
    torch.save(state, tmp_path / "src" / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ModelFormatError, match="refused for safety"):
        prepare_monolithic_safetensors(tmp_path / "src", tmp_path / "m.safetensors")
    with pytest.raises(ModelFormatError, match="refused for safety"):
        iter_checkpoint_tensors(tmp_path / "src")
    assert not marker.exists()
    assert not (tmp_path / "m.safetensors").exists()


def test_missing_local_path_and_unreachable_hub_id_give_model_format_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelFormatError, match="no such folder"):
        resolve_model(tmp_path / "missing")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelFormatError, match="not in the Hugging Face cache"):
        resolve_model("lema-tests/does-not-exist")


def test_cli_convert_writes_the_file(tmp_path):
    save_tiny("gpt2", tmp_path / "src")
    out = tmp_path / "gpt2.safetensors"
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "src"), str(out), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert load_file(out)["lm_head.weight"].dtype == torch.float16


def test_cli_convert_missing_model_is_one_error_line(tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "missing"), str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2
    assert result.output.startswith("Error:")
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.safetensors").exists()


def test_streaming_writer_output_loads_with_safetensors_and_checks_its_input(tmp_path):
    from lema.adapters.weights.safetensors_writer import open_safetensors_writer

    tensors = {"z": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}
    entries = [(n, t.dtype, t.shape) for n, t in tensors.items()]
    with open_safetensors_writer(tmp_path / "x.safetensors", entries, {"k": "v"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    got = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(got[n], t) and got[n].dtype == t.dtype for n, t in tensors.items())
    assert (tmp_path / "x.safetensors").read_bytes()[8:].index(b"}") > 0
    assert int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little") % 8 == 0
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
    for wrong in [("a", torch.arange(7)), ("z", torch.zeros(5, 3).to(torch.bfloat16)), ("z", torch.zeros(3, 5))]:
        with pytest.raises(ValueError):
            with open_safetensors_writer(tmp_path / "y.safetensors", entries) as w:
                w.write(*wrong)
    with pytest.raises(ValueError, match="never written"):
        with open_safetensors_writer(tmp_path / "y.safetensors", entries) as w:
            w.write("z", tensors["z"])
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]
