"""Preference steps on the streamed engine: the same-pass reference equals a two-pass one and
moves no more link bytes than SFT; IPO, SimPO and ORPO equal their formulas computed from
transformers' own log-probs (ORPO through TRL's ``odds_ratio_loss``); a CLI DPO run under a
device budget smaller than the weights learns a learnable preference."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lema import LemaConfig, LemaModel
from lema.app.runtime.preference_pass import PreferencePass, reference_logps_two_pass
from lema.app.training.preference_step import frozen_adapter, use_preference
from lema.app.training.trainer import step_with_cast
from lema.data.preference import collate_pairs, load_preference
from lema.domain.model import heads
from lema.domain.objectives.preference import PreferenceObjective
from tests.chat_models import ANSWER, WORDS, chat_llama_folder, chat_tokenizer
from tests.model_files import save_monolithic
from tests.tolerance import assert_close, forward_floor

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    import peft
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("pref_engine")
    chat_llama_folder(folder / "hf", hidden=32, layers=2)
    hf = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32, attn_implementation="sdpa")
    save_monolithic(hf, folder / "model.safetensors")
    torch.manual_seed(5)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    pm.save_pretrained(folder / "adapter")
    rows = [{"prompt": " ".join(WORDS[i:i + 3 + i % 2]) + " ", "chosen": ANSWER,
             "rejected": " ".join(WORDS[2 * i:2 * i + 4])} for i in range(4)]
    (folder / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _model(folder: Path, **extra) -> LemaModel:
    model = LemaModel(LemaConfig(model_name_or_path=str(folder / "hf"), gbi_path=str(folder / "model.safetensors"),
                                 device="cpu", lora_rank=4, lora_alpha=8, lora_target_modules=TARGETS, **extra))
    model.load_adapter(folder / "adapter")
    return model


def _batch(folder: Path, method: str = "dpo"):
    tok = chat_tokenizer()
    return collate_pairs(load_preference(str(folder / "pref.jsonl"), tok, method=method, seq=64), tok.pad_token_id)


def test_same_pass_reference_equals_two_pass_and_moves_sft_bytes(base):
    batch = _batch(base)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    with _model(base, vram_budget="64M", prefetch_distance=1) as model:
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
        reference = frozen_adapter(model.require_lora())
        # SFT on the same chosen + rejected rows: the link bytes to match
        trainer.train_step(ids, labels=labels, attention_mask=mask)
        sft_bytes = trainer.last_report.bytes_uploaded
        trainer.discard_accumulation()
        objective = PreferenceObjective("dpo")
        prepared = trainer.prepare_batch(ids, None, mask)
        answer = model.targets_for(ids, labels, mask) != heads.IGNORE_INDEX
        two_pass, report = reference_logps_two_pass(model.engine, model.cast_weights, model.spec, prepared.ctx,
                                                    prepared.x0, prepared.targets, answer, reference)
        step = PreferencePass(model.spec, model.require_lora(), prepared.ctx, prepared.x0, prepared.targets,
                              objective=objective, answer_mask=answer, reference=reference)
        dpo = model.engine.run(step_with_cast(model, step), mode="train",
                               backward_units=frozenset(u.index for u in model.spec.decoder_units), inputs=step)
    assert sft_bytes > 0
    assert dpo.bytes_uploaded <= 1.1 * sft_bytes, (dpo.bytes_uploaded, sft_bytes)
    assert report.bytes_uploaded > 0  # the two-pass reference streams the weights once more
    same = step.reference_logps
    assert torch.equal(same.answer, two_pass.answer)  # the same operations on the same weights


def _hf_token_logps(folder: Path, batch) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32, attn_implementation="sdpa")
    pm = PeftModel.from_pretrained(hf, str(folder / "adapter")).eval()
    with torch.no_grad():
        logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _gather(logp: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    picked = logp.gather(-1, ids[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(1)


@pytest.mark.parametrize("method", ["ipo", "simpo", "orpo"])
def test_first_step_equals_the_formula_from_transformers_logprobs(base, method):
    batch = _batch(base, method)
    ids = batch["input_ids"]
    answer = (batch["labels"][:, 1:] != -100).float()
    full = batch["attention_mask"][:, 1:].float()
    logp = _hf_token_logps(base, batch)
    sums, counts = _gather(logp, ids, answer), answer.sum(1)
    n = ids.shape[0] // 2
    beta = 0.2
    if method == "ipo":  # the policy is the reference at step 1 (adapter copy): rewards 0
        expected = {"loss": float(((torch.zeros(n)) - 1 / (2 * beta)).pow(2).mean()),
                    "logps/chosen": float(sums[:n].mean()), "logps/rejected": float(sums[n:].mean())}
    else:
        avg = sums / counts
        if method == "simpo":
            logits = (avg[:n] - avg[n:]) - 0.5 / beta
            loss = -F.logsigmoid(beta * logits).mean()
        else:
            from trl.experimental.orpo import ORPOTrainer

            fake = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
            losses, *_ = ORPOTrainer.odds_ratio_loss(fake, avg[:n], avg[n:])
            nll = -(_gather(logp, ids, full)[:n].sum() / full[:n].sum())
            loss = nll - losses.mean()
        expected = {"loss": float(loss), "logps/chosen": float(avg[:n].mean()), "logps/rejected": float(avg[n:].mean()),
                    "rewards/chosen": float(beta * avg[:n].mean()), "rewards/margins": float(beta * (avg[:n] - avg[n:]).mean())}
    with _model(base) as model:
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
        objective = PreferenceObjective(method, beta=beta)
        use_preference(trainer, objective, frozen_adapter(model.require_lora()) if objective.needs_reference else None)
        trainer.train_step(ids, labels=batch["labels"], attention_mask=batch["attention_mask"])
        got = trainer.last_metrics
    floor = forward_floor(model.spec, ids.shape[1], extra=1)
    for name, value in expected.items():
        assert_close(torch.tensor([got[name]]), torch.tensor([value]), floor=floor, what=f"{method} {name}")


def test_cli_dpo_under_a_budget_smaller_than_the_weights_learns(tmp_path):
    from click.testing import CliRunner

    from lema.cli import main

    chat_llama_folder(tmp_path / "hf", hidden=256, layers=4)  # ~9 MiB of fp32 weights
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(4)) + " ", "chosen": ANSWER,
             "rejected": " ".join(rng.choice(WORDS) for _ in range(6))} for _ in range(16)]
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["train", "--model", str(tmp_path / "hf"), "--data", str(tmp_path / "pref.jsonl"),
                                       "--out", str(tmp_path / "run"), "--method", "dpo", "--beta", "0.1",
                                       "--steps", "6", "--batch", "2", "--seq", "40", "--lr", "3e-3", "--rank", "4",
                                       "--vram", "8M", "--prefetch", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    weights = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors"))
    assert weights > 8 * 2**20  # the budget is smaller than the weights: they stream
    assert "budget" in result.output and "fits" in result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "loss"} <= set(records[0])
    first, last = records[0], records[-1]
    assert first["rewards/accuracies"] == 0.0  # the policy starts as the reference: no margin yet
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > first["rewards/margins"]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def _dpo_grads(folder: Path, batch, *, checkpointing: bool = True, tile: int = 0, prefetch: int = 1, **config):
    """One DPO pass (same-pass reference) on the engine: its metrics and the LoRA gradients."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    with _model(folder, vram_budget="64M", prefetch_distance=prefetch, **config) as model:
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
        prepared = trainer.prepare_batch(ids, None, mask)
        answer = model.targets_for(ids, labels, mask) != heads.IGNORE_INDEX
        step = PreferencePass(model.spec, model.require_lora(), prepared.ctx, prepared.x0, prepared.targets,
                              checkpointing=checkpointing, tile_tokens=tile, objective=PreferenceObjective("dpo"),
                              answer_mask=answer, reference=frozen_adapter(model.require_lora()))
        report = model.engine.run(step_with_cast(model, step), mode="train", inputs=step,
                                  backward_units=frozenset(u.index for u in model.spec.decoder_units))
        grads = [p.grad.detach().clone() for p in model.get_trainable_parameters()]
        return step.metrics, grads, report, model.spec


@pytest.mark.parametrize("path", ["no-checkpointing", "tiles", "offload"])
def test_dpo_step_through_each_engine_path_equals_the_plain_path(base, path):
    batch = _batch(base)
    seq = batch["input_ids"].shape[1]
    plain, plain_grads, _, spec = _dpo_grads(base, batch)
    options = {"no-checkpointing": dict(checkpointing=False, gradient_checkpointing=False),
               "tiles": dict(tile=max(1, seq // 4)),
               "offload": dict(offload_activations=True, prefetch=0)}[path]  # 2 layers: 1 kept, 1 offloaded
    metrics, grads, report, _ = _dpo_grads(base, batch, **options)
    if path == "offload":
        assert report.activation_bytes > 0  # the layer inputs went to host memory and back
    floor = forward_floor(spec, seq, extra=2)  # + the loss and its backward
    for name in ("loss", "logps/chosen", "logps/rejected"):  # rewards are 0 at the first step (policy = reference)
        assert_close(torch.tensor([metrics[name]]), torch.tensor([plain[name]]), floor=floor, what=f"{path} {name}")
    assert_close(grads, plain_grads, floor=floor, what=f"{path} LoRA gradients")


def _formula_loss(method: str, policy_sums: torch.Tensor, counts: torch.Tensor, ref_sums: torch.Tensor,
                  full_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """The objective's loss from log-probs (TRL 1.16's formulas; ORPO through TRL's own odds-ratio term)."""
    n = policy_sums.shape[0] // 2
    if method == "ipo":  # TRL: the log-ratio margins averaged over the answer tokens
        avg, ref = policy_sums / counts, ref_sums / counts
        logits = (avg[:n] - avg[n:]) - (ref[:n] - ref[n:])
        return ((logits - 1 / (2 * beta)) ** 2).mean()
    avg = policy_sums / counts
    if method == "simpo":
        return -F.logsigmoid(beta * ((avg[:n] - avg[n:]) - 0.5 / beta)).mean()
    from trl.experimental.orpo import ORPOTrainer

    fake = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, avg[:n], avg[n:])
    return full_nll - losses.mean()


@pytest.mark.parametrize("method", ["ipo", "simpo", "orpo"])
def test_three_adamw_steps_equal_peft_trained_on_the_formula(base, method):
    """3 AdamW steps (fp32, dropout 0) from the same adapter on the same batch: LEMA's losses and
    adapters equal peft's, trained on the objective's formula from transformers' log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batch = _batch(base, method)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    answer = (batch["labels"][:, 1:] != -100).float()
    full = mask[:, 1:].float()
    n, beta = ids.shape[0] // 2, 0.2
    hf = AutoModelForCausalLM.from_pretrained(base / "hf", dtype=torch.float32, attn_implementation="sdpa")
    pm = PeftModel.from_pretrained(hf, str(base / "adapter"), is_trainable=True)
    pm.train()
    with torch.no_grad():  # the reference: the starting adapter, frozen
        ref_sums = _gather(torch.log_softmax(pm(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1),
                           ids, answer)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    theirs = []
    for _ in range(3):
        logp = torch.log_softmax(pm(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        full_nll = -(_gather(logp, ids, full)[:n].sum() / full[:n].sum())
        loss = _formula_loss(method, _gather(logp, ids, answer), answer.sum(1), ref_sums, full_nll, beta)
        loss.backward()
        opt.step()
        opt.zero_grad()
        theirs.append(float(loss))
    with _model(base, max_grad_norm=None) as model:
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
        objective = PreferenceObjective(method, beta=beta)
        use_preference(trainer, objective, frozen_adapter(model.require_lora()) if objective.needs_reference else None)
        ours = []
        for _ in range(3):
            trainer.train_step(ids, labels=batch["labels"], attention_mask=mask)
            ours.append(trainer.last_metrics["loss"])
        mine = model.require_lora().state_dict_peft(model.spec)
    want = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    assert set(mine) == set(want)
    floor = forward_floor(model.spec, ids.shape[1], extra=3)
    assert_close(torch.tensor(ours), torch.tensor(theirs), floor=floor, what=f"{method} losses")
    relative = float(torch.cat([(mine[k] - want[k]).flatten() for k in mine]).norm()
                     / torch.cat([want[k].flatten() for k in mine]).norm())
    assert relative <= 1e-3, (method, relative)  # the bound for adapters after 3 AdamW steps


def test_a_float16_preference_step_scales_its_loss_as_the_trainer_unscales_it(base):
    """In float16 the trainer scales the loss (issue 23): the preference pass multiplies by
    the same scale the optimizer step divides by, so one SGD step moves the adapters as the
    unscaled float16 step does (to float16's rounding), not 65536 times less."""
    import warnings

    batch = _batch(base)
    moves = {}
    for scaled in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the float16 warning
            model = _model(base, max_grad_norm=None, dtype="float16")
        with model:
            trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1))
            assert trainer.loss_scale == 2.0**16
            if not scaled:
                trainer.scaler = None
            use_preference(trainer, PreferenceObjective("dpo"), frozen_adapter(model.require_lora()))
            start = torch.cat([p.detach().flatten().clone() for p in model.get_trainable_parameters()])
            trainer.train_step(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
            moves[scaled] = torch.cat([p.detach().flatten() for p in model.get_trainable_parameters()]) - start
    assert float(moves[False].norm()) > 0
    assert float((moves[True] - moves[False]).norm() / moves[False].norm()) <= 1e-2
