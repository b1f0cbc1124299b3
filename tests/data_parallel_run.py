"""The Python API's data-parallel run, for tests: one process, or torchrun ranks.

``python -m torch.distributed.run --nproc-per-node 2 tests/data_parallel_run.py MODEL OUT``
trains the micro-batches of :func:`global_batches` with each rank on its rows, records
the timeline of the last backward, evaluates, saves a checkpoint, then makes rank 1 fail
twice (bad token ids before the pass, out of device memory inside it) and writes what
every rank saw to ``OUT/rank<r>.json``. The tests run the same micro-batches in one
process with :func:`train` and compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

VOCAB = 128
SEQ = 16
ACCUMULATION = 2
# Rows per micro-step: full, full, a short one the ranks split 1/1, a 1-row one (rank 1
# gets it, rank 0 none), then full again.
ROWS = (4, 4, 2, 1, 4, 4)


def global_batches() -> list[dict[str, torch.Tensor]]:
    """The micro-batches of the run (random ids, right padding of random length)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for rows in ROWS:
        ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
        lengths = torch.randint(3, SEQ + 1, (rows,), generator=gen)
        mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def eval_batches() -> list[tuple[torch.Tensor, None, None]]:
    gen = torch.Generator().manual_seed(11)
    return [(torch.randint(0, VOCAB, (2, SEQ), generator=gen), None, None) for _ in range(3)]


def make_trainer(path: str, capacity: int | None = None) -> Any:
    """A trainer on a CPU device that keeps a timeline (and enforces ``capacity`` bytes); with
    ``LEMA_TEST_DEVICE=late`` in the environment, on the late device (issue 23)."""
    import os

    from lema import LemaConfig, LemaModel
    from lema.adapters.devices.cpu import CpuDevice
    from lema.adapters.devices.late_cpu import LateCpuDevice

    cfg = dict(gbi_path=str(path), device="cpu", lora_rank=4, seed=3, batch_size=2, max_seq_len=SEQ,
               gradient_accumulation_steps=ACCUMULATION)
    late = os.environ.get("LEMA_TEST_DEVICE") == "late"
    device = LateCpuDevice(capacity=capacity, seed=int(os.environ.get("RANK", "0"))) if late else \
        CpuDevice(capacity=capacity, direct_reads=True)
    model = LemaModel(LemaConfig(**cfg), device=device)
    model.initialize_lora()
    optimizer = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model.get_trainer(optimizer, scheduler=scheduler, bucket_bytes=1)


def rows(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    from lema.data.sharding import shard_bounds

    lo, hi = shard_bounds(batch["input_ids"].shape[0], rank, world)
    return {k: v[lo:hi] for k, v in batch.items()}


def train(trainer: Any, rank: int = 0, world: int = 1, blocking: list[int] | None = None) -> list[float]:
    """Train on this rank's rows of every micro-batch; under data parallel, ``blocking`` gets
    how many collectives each micro-step waited for where it issued them."""
    from lema.app.parallel import distributed

    losses = []
    counts = [] if blocking is None else blocking

    def count(name: str, waits: bool) -> None:
        counts[-1] += waits

    for batch in global_batches():
        mine = rows(batch, rank, world)
        counts.append(0)
        with distributed.observe_collectives(count):
            _, loss = trainer.train_step(mine["input_ids"], labels=mine["labels"],
                                         attention_mask=mine["attention_mask"])
        losses.append(loss)
    return losses


def _attempt(fn: Any) -> dict[str, str]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "none", "message": ""}


def main(model_path: str, out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    budget = int(make_trainer(model_path).model.plan().device_total * 1.25)
    trainer = make_trainer(model_path, capacity=budget)
    blocking: list[int] = []
    losses = train(trainer, rank, world, blocking)
    events = [e[:-1] for e in trainer.last_report.timeline if e[0] in ("compute_start", "grad_allreduce")]
    result: dict[str, Any] = {
        "device": type(trainer.model.device).__name__, "losses": losses, "blocking": blocking,
        "events": [[e[0], list(e[1]) if isinstance(e[1], tuple) else e[1], *e[2:]] for e in events],
        "eval": trainer.evaluate(eval_batches()), "global_step": trainer.global_step,
        "checkpoint": str(trainer.save_checkpoint(Path(out) / "ckpt")),
    }
    bad = global_batches()[0]["input_ids"][:2].clone()
    if rank == 1:
        bad[0, 3] = VOCAB + 5  # a token id the model does not have
    result["bad_ids"] = _attempt(lambda: trainer.train_step(bad))
    big = torch.randint(0, VOCAB, (2 if rank == 0 else 32, SEQ * 4), generator=torch.Generator().manual_seed(rank))
    result["out_of_memory"] = _attempt(lambda: trainer.train_step(big))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
