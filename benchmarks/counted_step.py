"""Training steps on a CPU device that counts every allocation (a capacity to enforce): the
allocation counter's argument walk against ``torch.utils._pytree``, side by side in one run.

Builds the tiny demo model (hidden 256, 12 layers; ``lema demo --size tiny``), then runs
training steps round-robin with the counter's storage walk as LEMA has it and with the
``tree_flatten`` walk it replaced, and prints the median step of each and their ratio.

    python benchmarks/counted_step.py [--steps 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def pytree_storages(tree: Any, found: Any = None) -> list:
    """The walk the counter used before: ``torch.utils._pytree.tree_flatten``."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves, _ = tree_flatten(tree)
    return [t.untyped_storage() for t in leaves if isinstance(t, torch.Tensor) and t.device.type != "meta"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from lema import LemaConfig, LemaModel
    from lema.adapters.devices import allocation_counter
    from lema.cli.demo_cmd import build_base_model, demo_assets
    from lema.data.loading import DataOptions, load_data
    from lema.data.packing import PackedExamples, collate_packed
    from lema.data.tokenizer import load_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lema-counted-"))
    tok = load_tokenizer(demo_assets())
    weights = build_base_model(work / "base", tok, "tiny", seed=0)
    store = load_data(demo_assets() / "train.jsonl", tok, DataOptions(seq=96)).store
    rows = PackedExamples(store, 96)
    model = LemaModel(LemaConfig(gbi_path=str(weights), model_name_or_path=str(work / "base"), device="cpu",
                                 lora_rank=4, batch_size=1, max_seq_len=96, prefetch_distance=0,
                                 vram_budget="16M"))
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
    walks = {"direct walk (LEMA)": allocation_counter._storages, "torch.utils._pytree": pytree_storages}
    times: dict[str, list[float]] = {name: [] for name in walks}
    for step in range(args.steps + 1):  # the first round warms up
        for name, walk in walks.items():
            allocation_counter._storages = walk
            batch = collate_packed([rows[step % len(rows)]], 0)
            t0 = time.perf_counter()
            trainer.train_step(batch["input_ids"], batch["labels"], batch["attention_mask"],
                               position_ids=batch["position_ids"])
            if step:
                times[name].append(time.perf_counter() - t0)
    allocation_counter._storages = walks["direct walk (LEMA)"]
    model.close()
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"{name:>22}: median step {m:.3f} s over {len(times[name])} steps")
    print(f"ratio direct / pytree: {medians['direct walk (LEMA)'] / medians['torch.utils._pytree']:.2f}")


if __name__ == "__main__":
    main()
