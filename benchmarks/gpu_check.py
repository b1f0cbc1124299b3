"""GPU check: a Llama-2-7B-shaped fp16 model on one NVIDIA GPU, in under 10 minutes.

Writes a random Llama-2-7B-shaped fp16 model, measures pinned host->device bandwidth,
runs `lema plan`, then a few STREAMING and AUTO training steps at batch 1, sequence 512,
and prints step time, the link floor (bytes uploaded per step / bandwidth, and the issue's
2 x streamed bytes / bandwidth), their ratio, and peak VRAM next to the plan. Every stage
is independent: one that fails prints its error and the next one runs.

    bash benchmarks/gpu_check.sh            # or: python benchmarks/gpu_check.py --out DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS: dict = {}


def stage(name):
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n=== {name} ===", flush=True)
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                RESULTS[name] = out
                print(json.dumps(out, indent=1, default=str), flush=True)
                return out
            except Exception as exc:  # a failed stage must not hide the others' numbers
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
                return None
            finally:
                print(f"--- {name}: {time.perf_counter() - start:.1f} s", flush=True)
        return run
    return wrap


@stage("environment")
def environment():
    props = torch.cuda.get_device_properties(0)
    return {"torch": torch.__version__, "gpu": props.name, "gpu_memory_bytes": props.total_memory,
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}


@stage("write_model")
def write_model(path: Path):
    if path.exists():
        return {"path": str(path), "bytes": path.stat().st_size, "reused": True}
    from benchmarks.write_random_model import write_random_model
    from lema.adapters.weights.builtin_models import builtin_config

    start = time.perf_counter()
    n = write_random_model(builtin_config("llama-2-7b"), str(path), "float16")
    return {"path": str(path), "bytes": n, "seconds": time.perf_counter() - start}


@stage("bandwidth")
def bandwidth():
    n = 1 << 30
    out = {}
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    for kind in ("pinned", "pageable"):
        src = torch.empty(n, dtype=torch.uint8, pin_memory=(kind == "pinned"))
        src.fill_(1)
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[f"{kind}_h2d_GBps"] = n / statistics.median(times[1:]) / 1e9
    return out


@stage("plan")
def plan(path: Path):
    cmd = ["lema", "plan", "--model", str(path), "--vram", "24G", "--json"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    data = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {"stdout": proc.stdout}
    return {"command": " ".join(cmd), "exit": proc.returncode, "seconds": seconds,
            "device_total_bytes": data.get("device", {}).get("total_bytes"), "fits": data.get("fits"),
            "stderr": proc.stderr[-500:]}


def train(path: Path, strategy: str, vram: str | None, steps: int, seq: int, link_Bps: float):
    from lema import LemaConfig, LemaModel

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    config = LemaConfig(gbi_path=str(path), device="cuda", strategy=strategy, vram_budget=vram,
                        batch_size=1, max_seq_len=seq, lora_rank=16)
    start = time.perf_counter()
    model = LemaModel(config)
    model.initialize_lora()
    build_s = time.perf_counter() - start
    optimizer = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4)
    trainer = model.get_trainer(optimizer)
    ids = torch.randint(0, model.spec.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    times, reports, losses = [], [], []
    for i in range(steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        _, loss = trainer.train_step(ids)
        torch.cuda.synchronize()
        if i:  # the first step warms up kernels and the page cache
            times.append(time.perf_counter() - t)
            reports.append(model.last_report)
        losses.append(loss)
    step_s = statistics.median(times)
    uploaded = statistics.median(r.bytes_uploaded for r in reports)
    plan = model.plan()
    streamed = sum(model.spec.units[u].nbytes for u in plan.streamed_units)
    out = {
        "strategy": strategy, "vram_budget": vram, "build_s": build_s, "step_s": step_s,
        "step_times_s": times, "losses": losses,
        "bytes_uploaded_per_step": uploaded, "floor_s_uploaded": uploaded / link_Bps,
        "ratio_step_to_uploaded_floor": step_s / (uploaded / link_Bps) if uploaded else None,
        "floor_s_2x_streamed": 2 * streamed / link_Bps,
        "ratio_step_to_2x_streamed_floor": step_s / (2 * streamed / link_Bps) if streamed else None,
        "wait_s": statistics.median(r.wait_seconds for r in reports),
        "compute_s": statistics.median(r.compute_seconds for r in reports),
        "peak_vram_bytes": torch.cuda.max_memory_allocated() - base,
        "plan_device_total_bytes": plan.device_total,
        "peak_over_plan": (torch.cuda.max_memory_allocated() - base) / plan.device_total,
        "resident_units": len(plan.resident_units),
    }
    model.engine.close()
    del model, trainer, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-file", default="/tmp/lema-gpu-check/llama2-7b-fp16.safetensors")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    path = Path(args.model_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    environment()
    write_model(path)
    bw = bandwidth() or {}
    link = bw.get("pinned_h2d_GBps", 25.0) * 1e9
    plan(path)
    runs = [("streaming", "24G"), ("auto", "24G"), ("auto", None)]
    for strategy, vram in runs:
        stage(f"train_{strategy}_{vram or 'all'}")(train)(path, strategy, vram, args.steps, args.seq, link)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print("\nwrote", Path(args.out) / "gpu_check.json")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
