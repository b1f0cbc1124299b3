"""Preference steps on the paths SFT has: a quantized (NF4) base, and exact resume.

* NF4: a DPO step on the NF4 base equals the same step on the dense model holding
  bitsandbytes' dequantized weights (written by ``merge_adapter`` with a zero adapter), same
  adapter, within the tolerance rule.
* Resume: ``lema train --method dpo`` stopped after 2 of 4 steps and resumed gives the adapter of
  the uninterrupted run, bit for bit (the same operations in the same order).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.app.training.preference_step import use_preference
from lema.domain.objectives.preference import PreferenceObjective
from tests.chat_models import ANSWER, WORDS, chat_llama_folder
from tests.tolerance import assert_close, forward_floor

LR = 0.5


def _lema(folder) -> LemaModel:
    return LemaModel(LemaConfig(model_name_or_path=str(folder), device="cpu", lora_rank=4, lora_alpha=8,
                                batch_size=4, max_seq_len=12, max_grad_norm=None, seed=5, preference="reference"))


def _dpo_step(model: LemaModel, ids, labels):
    with torch.no_grad():  # the same non-zero B on both models: the policy differs from the base (the reference)
        for p in model.get_trainable_parameters()[1::2]:
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=LR))
    use_preference(trainer, PreferenceObjective("dpo"), None)
    trainer.train_step(ids, labels=labels)
    return dict(trainer.last_metrics), [p.detach().clone() for p in model.get_trainable_parameters()]


def test_dpo_step_on_an_nf4_base_equals_the_dequantized_dense_model(quantized_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lema.app.tools.merge import merge_adapter

    folder = quantized_model("llama", "nf4")
    with _lema(folder) as model:
        model.initialize_lora()  # B = 0: merging it writes bitsandbytes' dequantized weights
        model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=LR)).save_checkpoint(tmp_path / "zero")
    dense = merge_adapter(folder, tmp_path / "zero", tmp_path / "dense", hf_folder=True)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    results = {}
    for name, path in (("nf4", folder), ("dense", dense)):
        with _lema(path) as model:
            model.initialize_lora()
            results[name] = _dpo_step(model, ids, labels)
            spec = model.spec
    (nf4, nf4_params), (plain, plain_params) = results["nf4"], results["dense"]
    assert nf4["rewards/chosen"] != 0.0  # the policy is not the reference
    floor = forward_floor(spec, 12, extra=spec.n_layers + 2)  # forward, backward, the step
    for name in ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
        assert_close(torch.tensor([nf4[name]]), torch.tensor([plain[name]]), floor=floor, what=name)
    assert_close(nf4_params, plain_params, floor=floor, what="adapter after the step")


def _train(folder, data, out, steps, *extra, method="dpo"):
    from click.testing import CliRunner

    from lema.cli import main

    result = CliRunner().invoke(main, ["train", "--model", str(folder), "--data", str(data), "--out", str(out),
                                       "--method", method, "--steps", str(steps), "--batch", "2", "--seq", "40",
                                       "--lr", "3e-3", "--rank", "4", "--save-steps", "2", "--device", "cpu",
                                       "--vram", "64M", "--prefetch", "0", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_dpo_resume_gives_the_uninterrupted_adapter_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    chat_llama_folder(tmp_path / "hf", hidden=32, layers=2)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(4)) + " ", "chosen": ANSWER,
             "rejected": " ".join(rng.choice(WORDS) for _ in range(6))} for _ in range(8)]
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _train(tmp_path / "hf", data, tmp_path / "whole", 4)
    _train(tmp_path / "hf", data, tmp_path / "part", 2)
    output = _train(tmp_path / "hf", data, tmp_path / "part", 4, "--resume")
    assert "resuming" in output
    whole = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "part" / "final" / "adapter_model.safetensors")
    assert set(whole) == set(resumed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    metrics = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics][-2:] == [3, 4] and "rewards/margins" in metrics[-1]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_precomputed_reference_column_equals_the_same_pass_reference(tmp_path, method):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lema.app.training.reference_cache import FILE

    chat_llama_folder(tmp_path / "hf", hidden=32, layers=2)
    rng = random.Random(1)
    if method == "dpo":
        rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(4)) + " ", "chosen": ANSWER,
                 "rejected": " ".join(rng.choice(WORDS) for _ in range(6))} for _ in range(6)]
    else:  # KTO: the KL rows' reference values are cached too
        rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(4)) + " ",
                 "completion": ANSWER if i % 2 else " ".join(rng.choice(WORDS) for _ in range(5)),
                 "label": bool(i % 2)} for i in range(6)]
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _train(tmp_path / "hf", data, tmp_path / "same", 3, method=method)
    output = _train(tmp_path / "hf", data, tmp_path / "cached", 3, "--precompute-ref", method=method)
    assert "computed once" in output
    with safe_open(str(tmp_path / "cached" / FILE), framework="pt") as f:
        assert len(f.metadata()["key"]) == 64 and tuple(f.get_tensor("logps").shape) == (6, 2)
    same = load_file(tmp_path / "same" / "final" / "adapter_model.safetensors")
    cached = load_file(tmp_path / "cached" / "final" / "adapter_model.safetensors")
    from lema.domain.model.spec import ModelSpec

    spec = ModelSpec.from_config(json.loads((tmp_path / "hf" / "config.json").read_text()), dtype="F32")
    floor = forward_floor(spec, 40, extra=spec.n_layers + 2 + 3)  # + three AdamW steps
    assert_close([cached[k] for k in sorted(same)], [same[k] for k in sorted(same)], floor=floor,
                 what="adapter, cached vs same-pass reference")
    m_same, m_cached = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                        for d in ("same", "cached"))
    for a, b in zip(m_same, m_cached):
        for name in ("logps/chosen", "logps/rejected", "loss") if method == "dpo" else ("loss", "kl"):
            assert_close(torch.tensor([b[name]]), torch.tensor([a[name]]), floor=floor, what=name)
    # --resume (same data, same reference) reads the column instead of computing it
    output = _train(tmp_path / "hf", data, tmp_path / "cached", 4, "--precompute-ref", "--resume", method=method)
    assert "read from" in output and "computed once" not in output


def test_precompute_ref_without_a_reference_is_one_error(tmp_path):
    from click.testing import CliRunner

    from lema.cli import main

    result = CliRunner().invoke(main, ["train", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"),
                                       "--out", str(tmp_path / "o"), "--method", "simpo", "--precompute-ref"])
    assert result.exit_code == 2 and "Error: --precompute-ref" in result.output and "Traceback" not in result.output
