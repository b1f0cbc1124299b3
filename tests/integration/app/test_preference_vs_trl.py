"""Preference objectives against TRL: same tiny model, same starting adapter, same batch, fp32, 3 AdamW steps.

DPO and KTO run TRL's own trainers (``trl.DPOTrainer``, ``trl.KTOTrainer``) on a peft model
that already carries the adapter (TRL then uses a frozen copy of it as the reference, as
LEMA does). ORPO, SimPO and IPO are checked against the formula computed from transformers'
own log-probs of the same batch (TRL's ORPO/CPO trainers tokenize with their older, separate
pipeline, so they cannot be fed the same rows): TRL's ``odds_ratio_loss`` is called for ORPO.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from lema import LemaConfig, LemaModel  # noqa: E402
from lema.app.training.preference_step import frozen_adapter, use_preference  # noqa: E402
from lema.data.preference import collate_pairs, collate_unpaired, load_preference  # noqa: E402
from lema.domain.objectives.preference import PreferenceObjective  # noqa: E402
from tests.chat_models import ANSWER, WORDS, chat_llama_folder, chat_tokenizer  # noqa: E402
from tests.model_files import save_monolithic  # noqa: E402
from tests.tolerance import assert_close, forward_floor  # noqa: E402

LR = 5e-3
STEPS = 3
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pairs(n: int = 4) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        prompt = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(3 + i % 2))
        rows.append({"prompt": prompt + " ", "chosen": ANSWER, "rejected": " ".join(WORDS[i:i + 3 + i % 3])})
    return rows


def _unpaired(n: int = 4) -> list[dict]:
    rows = []
    for i, pair in enumerate(_pairs(n)):
        good = i % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"] if good else pair["rejected"],
                     "label": good})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny chat Llama, its monolithic file, and a peft adapter with non-zero B (an 'SFT adapter')."""
    import peft
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("pref")
    chat_llama_folder(folder / "hf", hidden=32, layers=2)
    hf = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32, attn_implementation="sdpa")
    save_monolithic(hf, folder / "model.safetensors")
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                                 init_lora_weights=False))
    pm.save_pretrained(folder / "adapter")
    return folder


def _lema(folder: Path) -> LemaModel:
    model = LemaModel(LemaConfig(model_name_or_path=str(folder / "hf"), gbi_path=str(folder / "model.safetensors"),
                                 device="cpu", lora_rank=4, lora_alpha=8, lora_target_modules=TARGETS, dtype="float32"))
    model.load_adapter(folder / "adapter")
    return model


def _run_lema(folder: Path, objective: PreferenceObjective, rows: list[dict], tmp: Path
              ) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    data = tmp / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = chat_tokenizer()
    examples = load_preference(str(data), tok, method=objective.method, seq=64, batch=len(rows))
    collate = collate_unpaired if objective.method == "kto" else collate_pairs
    batch = collate(examples, tok.pad_token_id)
    model = _lema(folder)
    with model:
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=LR, weight_decay=0.0))
        use_preference(trainer, objective, frozen_adapter(model.require_lora()) if objective.needs_reference else None)
        logs = []
        for _ in range(STEPS):
            trainer.train_step(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                               desirable=batch.get("desirable"))
            logs.append(dict(trainer.last_metrics))
        return logs, model.require_lora().state_dict_peft(model.spec)


def _trl_trainer(folder: Path, kind: str, rows: list[dict], tmp: Path, beta: float):
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32, attn_implementation="sdpa")
    pm = PeftModel.from_pretrained(hf, str(folder / "adapter"), is_trainable=True)
    common = dict(output_dir=str(tmp / "trl"), per_device_train_batch_size=len(rows), max_steps=STEPS,
                  learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, bf16=False, fp16=False,
                  logging_steps=1, report_to="none", save_strategy="no", beta=beta, use_cpu=True, seed=0,
                  max_length=64, dataloader_num_workers=0)
    ds = datasets.Dataset.from_list(rows)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=pm, args=DPOConfig(**common), train_dataset=ds, processing_class=chat_tokenizer())
    else:
        from trl import KTOConfig, KTOTrainer

        trainer = KTOTrainer(model=pm, args=KTOConfig(**common), train_dataset=ds, processing_class=chat_tokenizer())
    losses: list[float] = []
    compute = trainer.compute_loss

    def recorded(*args, **kwargs):  # the exact loss (the log rounds it)
        out = compute(*args, **kwargs)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = recorded
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h or "rewards/rejected" in h]
    for h, loss in zip(logs, losses):
        h["loss"] = loss
    tensors = {k.replace(".default", ""): v.detach().clone() for k, v in pm.state_dict().items()
               if "lora_" in k and ".default" in k}
    return logs, tensors


def _compare(ours: list[dict], theirs: list[dict], names: tuple[str, ...], spec_like, lema_ad, trl_ad, what: str,
             beta: float = 0.1):
    assert len(ours) == len(theirs) == STEPS
    floor = forward_floor(spec_like, 64, extra=STEPS + 1)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for name in names:
            if name in b:
                # A reward (and KTO's kl) is beta x a difference of log-probs: its rounding is
                # relative to the log-probs it cancels, not to the small difference left.
                scale = 1.0
                if name.startswith("rewards/") and name != "rewards/accuracies" or name == "kl":
                    operands = beta * max(abs(float(b.get("logps/chosen", 0))), abs(float(b.get("logps/rejected", 0))))
                    scale = max(1.0, operands / max(abs(float(b[name])), 1e-12))
                assert_close(torch.tensor([a[name]]), torch.tensor([float(b[name])]), floor=floor * scale,
                             what=f"{what} step {step + 1} {name}")
    keys = sorted(set(trl_ad) & set(lema_ad))
    assert len(keys) == len(lema_ad)
    # Adam's first steps amplify rounding (an update is about lr * sign(grad)): the 1e-3.
    assert_close([lema_ad[k] for k in keys], [trl_ad[k] for k in keys], floor=1e-3 / 16, what=f"{what} adapters")


def test_dpo_matches_trl_dpotrainer(base, tmp_path):
    rows = _pairs()
    ours, lema_ad = _run_lema(base, PreferenceObjective("dpo", beta=0.1), rows, tmp_path)
    theirs, trl_ad = _trl_trainer(base, "dpo", rows, tmp_path, beta=0.1)
    _compare(ours, theirs, METRICS + ("rewards/accuracies",), _spec(base), lema_ad, trl_ad, "dpo")
    assert ours[-1]["rewards/margins"] > ours[0]["rewards/margins"]  # it learned something


def test_kto_matches_trl_ktotrainer(base, tmp_path):
    rows = _unpaired()
    ours, lema_ad = _run_lema(base, PreferenceObjective("kto", beta=0.1), rows, tmp_path)
    theirs, trl_ad = _trl_trainer(base, "kto", rows, tmp_path, beta=0.1)
    _compare(ours, theirs, METRICS + ("kl",), _spec(base), lema_ad, trl_ad, "kto")


def _spec(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder / "hf")
