"""Issue #4's benchmark: a ~100M-parameter bf16 Llama-shaped model, batch 4, sequence 256.

Prints, from one run, the median step time of (a) LEMA STREAMING, (b) LEMA RESIDENT,
(c) transformers + peft with gradient checkpointing and (d) without, and the ratios a/b,
a/c and a/d. Same targets, rank, optimizer (AdamW) and batch for all four.

    python benchmarks/train_bench.py [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lema.app.tools import benchmarking  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="100m")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lema-train-bench"))
    args = parser.parse_args()
    settings = benchmarking.BenchSettings(workdir=args.workdir, preset=args.preset, dtype=args.dtype, steps=args.steps,
                                          warmup=args.warmup, device=args.device,
                                          strategies=("streaming", "resident"))
    result = benchmarking.run(settings)
    for line in benchmarking.summary_lines(result):
        print(line)
    step = {r["name"]: r["step_s"] for r in result["runs"]}
    a = step["lema_streaming"]
    print(f"a/b (streaming / resident)            = {a / step['lema_resident']:.3f}  (target <= 1.15)")
    print(f"a/c (streaming / hf+peft checkpointed) = {a / step['hf_peft_ckpt']:.3f}  (target <= 1.0)")
    print(f"a/d (streaming / hf+peft no ckpt)      = {a / step['hf_peft_nockpt']:.3f}")
    benchmarking.dump(result, args.workdir / "train_bench.json")
    print(json.dumps({"a/b": a / step["lema_resident"], "a/c": a / step["hf_peft_ckpt"],
                      "a/d": a / step["hf_peft_nockpt"]}))


if __name__ == "__main__":
    main()
