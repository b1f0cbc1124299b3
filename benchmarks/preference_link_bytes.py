"""Link bytes and time of one DPO step (same-pass reference) vs SFT on the same chosen + rejected rows,
and of the two-pass reference, on a streamed tiny Llama (``python -m benchmarks.preference_link_bytes``).

Prints one line per step kind: bytes uploaded (the engine's StepReport), seconds. Runs on the
CPU in about 20 s (``--hidden 512 --layers 8``: about a minute); ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from lema import LemaConfig, LemaModel
    from lema.app.runtime.preference_pass import reference_logps_two_pass
    from lema.app.training.preference_step import frozen_adapter, use_preference
    from lema.data.preference import collate_pairs, load_preference
    from lema.domain.model import heads
    from lema.domain.objectives.preference import PreferenceObjective
    from tests.chat_models import ANSWER, WORDS, chat_llama_folder, chat_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = chat_llama_folder(Path(tmp) / "hf", hidden=args.hidden, layers=args.layers)
        rows = [{"prompt": " ".join(WORDS[i:i + 4]) + " ", "chosen": ANSWER, "rejected": " ".join(WORDS[i + 5:i + 11])}
                for i in range(args.pairs)]
        (Path(tmp) / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tok = chat_tokenizer()
        batch = collate_pairs(load_preference(str(Path(tmp) / "p.jsonl"), tok, method="dpo", seq=64), tok.pad_token_id)
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        model = LemaModel(LemaConfig(model_name_or_path=str(folder), device=args.device, vram_budget="1G",
                                     prefetch_distance=1, lora_rank=8, batch_size=ids.shape[0], max_seq_len=64))
        model.initialize_lora()
        with model:
            trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4))
            out = {}
            for kind in ("sft", "dpo (same pass)", "sft", "dpo (same pass)"):
                use_preference(trainer, PreferenceObjective("dpo") if kind != "sft" else None,
                                       frozen_adapter(model.require_lora()))
                t = time.perf_counter()
                trainer.train_step(ids, labels=labels, attention_mask=mask)
                out[kind] = (trainer.last_report.bytes_uploaded, time.perf_counter() - t)
            prepared = trainer.prepare_batch(ids, None, mask)
            answer = model.targets_for(ids, labels, mask) != heads.IGNORE_INDEX
            t = time.perf_counter()
            _, report = reference_logps_two_pass(model.engine, model.cast_weights, model.spec, prepared.ctx,
                                                 prepared.x0, prepared.targets, answer, None)
            out["two-pass reference forward (extra)"] = (report.bytes_uploaded, time.perf_counter() - t)
        for kind, (nbytes, seconds) in out.items():
            print(f"{kind:36s} {nbytes / 2**20:9.2f} MiB uploaded  {seconds:7.3f} s")
        print(f"dpo / sft link bytes: {out['dpo (same pass)'][0] / out['sft'][0]:.3f}")


if __name__ == "__main__":
    main()
