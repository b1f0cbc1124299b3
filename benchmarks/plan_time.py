"""Issue 27's benchmark: the plan's predicted step time against the measured one, and AUTO vs peft.

Part 1, prediction: for two model sizes (the 100m and 30m presets, bf16, batch 4 x seq 256,
LoRA r16 on all projections) and four ways of running them, one ``lema bench`` run each
(:func:`lema.app.tools.benchmarking.run`), the predicted step (``lema/domain/plan/timing.py``
at the rates measured as ``lema plan --calibrate`` measures them) beside the measured median:

* ``in-place``: the CPU computing on the weights where the host holds them (STREAMING);
* ``budget``: AUTO under a device budget (units through slots, what fits resident);
* ``slow-link``: STREAMING behind a simulated 0.1 GB/s link, slower than compute (link-bound);
* ``fast-link``: STREAMING behind a simulated 20 GB/s link, faster than compute.

Target: ``predicted / measured`` within 15% for every configuration (issue 27, CPU).

Part 2, AUTO vs transformers + peft on the 100m preset with memory to spare, in one bench
run: AUTO (keeps every layer's activations) <= 0.95 x peft without checkpointing and
<= 0.75 x peft with checkpointing; AUTO's adapters equal the checkpointed LEMA run's
(STREAMING, same steps) bit for bit or within 1e-6 relative.

    python benchmarks/plan_time.py [--steps 5] [--quick] [--out plan_time.json]

``--quick`` runs the tiny preset at batch 2 x 64 with 1 step: a check that the script works,
not a measurement. The full run takes about 6-8 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lema.app.tools import benchmarking  # noqa: E402

TOLERANCE = 0.15


def configurations(quick: bool) -> list[tuple[str, dict]]:
    presets = ["tiny"] if quick else ["100m", "30m"]
    out = []
    for preset in presets:
        # between STREAMING's plan and everything resident with every activation kept: AUTO chooses
        budget = "8M" if quick else ("300M" if preset == "100m" else "220M")
        out += [
            (f"{preset} in-place", dict(preset=preset, strategies=("streaming",))),
            (f"{preset} budget {budget}", dict(preset=preset, strategies=("auto",), vram=budget)),
            (f"{preset} slow link 0.1G/s", dict(preset=preset, strategies=("streaming",), link_bandwidth=0.1e9)),
            (f"{preset} fast link 20G/s", dict(preset=preset, strategies=("streaming",), link_bandwidth=20e9)),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, measure nothing")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lema-plan-time"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shape = dict(batch=2, seq=64) if args.quick else dict(batch=4, seq=256)
    steps = 1 if args.quick else args.steps
    rows, results = [], {}
    for name, extra in configurations(args.quick):
        settings = benchmarking.BenchSettings(workdir=args.workdir, steps=steps, warmup=args.warmup, rank=16,
                                              reference=False, compute_alone=False, **shape, **extra)
        print(f"== {name}", flush=True)
        result = benchmarking.run(settings, log=lambda line: print("   " + line, flush=True))
        results[name] = result
        for r in result["runs"]:
            ratio = r["predicted_over_measured"]
            rows.append((name, r["name"], r["predicted_s"], r["step_s"], ratio, abs(ratio - 1) <= TOLERANCE))
    print("\n== AUTO vs transformers + peft (memory to spare)", flush=True)
    preset = "tiny" if args.quick else "100m"
    settings = benchmarking.BenchSettings(workdir=args.workdir, preset=preset, steps=steps, warmup=args.warmup,
                                          rank=16, reference=True, compute_alone=False,
                                          strategies=("auto", "streaming"), **shape)
    versus = benchmarking.run(settings, log=lambda line: print("   " + line, flush=True))
    results["auto_vs_peft"] = versus
    for line in benchmarking.summary_lines(versus):
        print(line)
    step = {r["name"]: r for r in versus["runs"]}

    print("\nconfiguration                run                 predicted s  measured s  pred/meas  within 15%")
    for name, run, predicted, measured, ratio, ok in rows:
        print(f"{name:<28} {run:<18} {predicted:>12.3f} {measured:>11.3f} {ratio:>10.3f}  {'yes' if ok else 'NO'}")
    auto = step["lema_auto"]["step_s"]
    no_ckpt, ckpt = step["hf_peft_nockpt"]["step_s"], step["hf_peft_ckpt"]["step_s"]
    diff = step["lema_streaming"].get("adapters_max_rel_diff")
    print(f"AUTO (kept activations: {step['lema_auto']['kept_layers']} layers) / peft without checkpointing = "
          f"{auto / no_ckpt:.3f} (target <= 0.95)")
    print(f"AUTO / peft with checkpointing = {auto / ckpt:.3f} (target <= 0.75)")
    print(f"AUTO's adapters vs the checkpointed LEMA run (STREAMING): max relative difference {diff} "
          f"(target: 0, or <= 1e-6)")
    print(f"{sum(r[5] for r in rows)} of {len(rows)} configurations within 15% (target: all, at least 6)")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
