"""Host memory of RESIDENT data-parallel ranks on one machine: one copy of the weights or N?

Writes a random bf16 Llama-shaped model (about 3.4 GB by default: weights well above a
process's own few hundred MB, as in real runs), then launches torchrun (gloo, CPU) three
ways, each rank building a RESIDENT ``LemaModel`` and taking one training step before it
measures itself from ``/proc/self/smaps_rollup``:

* one rank alone (the weights in private RAM, as a single process always holds them);
* two ranks as LEMA runs them (the file mapped, its pages shared through the page cache);
* two ranks each holding a private copy (what two single processes would do), for contrast.

The host memory of a group of processes is the sum of their PSS (proportional set size:
each shared page is divided among the processes that map it), so pages two ranks share
count once. The ratio printed is the two ranks' summed PSS over the one rank's.

    python benchmarks/dp_host_memory.py [--layers 128] [--hidden 1024] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1024 * 1024
FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean")
TARGETS = ["q_proj", "v_proj"]  # LoRA rank 8: each rank's adapters, optimizer state and slots are its own


def smaps_rollup() -> dict[str, int]:
    """This process's memory totals in bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0].rstrip(":") in FIELDS:
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def worker(model: str, out: str, private: bool) -> None:
    """One rank: a RESIDENT model, one training step, then measure while every rank holds it."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    if private:  # pretend each rank is alone on its machine: a private copy each, as before
        os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = "0", "1"
    from lema import LemaConfig, LemaModel

    lema_model = LemaModel(LemaConfig(gbi_path=model, strategy="resident", device="cpu", lora_rank=8,
                                      lora_target_modules=TARGETS, batch_size=1, max_seq_len=32))
    lema_model.initialize_lora()
    trainer = lema_model.get_trainer(torch.optim.AdamW(lema_model.get_trainable_parameters(), lr=1e-4))
    ids = torch.randint(0, lema_model.spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    trainer.train_step(ids)
    if world > 1:
        torch.distributed.barrier()  # every rank holds its weights now
    usage = smaps_rollup()
    usage["weights"] = lema_model.source.nbytes
    rank = int(os.environ.get("RANK", "0"))
    Path(out, f"rank{rank}.json").write_text(json.dumps(usage))
    if world > 1:
        torch.distributed.barrier()  # nobody leaves before everyone has measured
        torch.distributed.destroy_process_group()


def launch(model: Path, nproc: int, private: bool, workdir: Path) -> list[dict[str, int]]:
    out = Path(tempfile.mkdtemp(dir=workdir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), __file__,
           "--worker", str(model), str(out)] + (["--private"] if private else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--private", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.private)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from write_random_model import write_random_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lema-dp-mem-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "model.safetensors"
    h = args.hidden
    config = {"model_type": "llama", "hidden_size": h, "intermediate_size": (h * 11) // 4,
              "num_hidden_layers": args.layers, "num_attention_heads": h // 64, "num_key_value_heads": h // 64,
              "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}
    size = write_random_model(config, str(model), dtype="bfloat16")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"model: llama, {args.layers} layers, hidden {h}, bf16, {size / MiB:,.0f} MiB of weights; machine: {cpu}, "
          f"{os.cpu_count()} CPUs; torch gloo, CPU device, RESIDENT, LoRA rank 8 on {','.join(TARGETS)}, "
          "one training step per rank")
    runs = {"1 rank": launch(model, 1, False, workdir),
            "2 ranks (shared, LEMA)": launch(model, 2, False, workdir),
            "2 ranks (private copies)": launch(model, 2, True, workdir)}
    one = sum(r["Pss"] for r in runs["1 rank"])
    print(f"{'run':<26}{'sum PSS':>12}{'per-rank RSS':>26}{'per-rank USS':>26}{'vs 1 rank':>11}")
    for name, ranks in runs.items():
        pss = sum(r["Pss"] for r in ranks)
        rss = " + ".join(f"{r['Rss'] / MiB:,.0f}" for r in ranks)
        uss = " + ".join(f"{(r['Private_Clean'] + r['Private_Dirty']) / MiB:,.0f}" for r in ranks)
        print(f"{name:<26}{pss / MiB:>9,.0f} MiB{rss:>22} MiB{uss:>22} MiB{pss / one:>10.2f}x")


if __name__ == "__main__":
    main()
