"""A LemaModel training step as a PyTorch module (``model(ids, labels=ids).loss.backward()``,
clip, ``optimizer.step()``) against ``trainer.train_step``, side by side in one run.

Builds the tiny demo model (hidden 256, 12 layers; ``lema demo --size tiny``), then runs
the two kinds of step round-robin on two models built alike, and prints the median step of
each, their ratio (expected about 1: the same streamed pass), the largest relative
difference of the adapters after the run (expected 0 on the CPU: the same ops) and each
path's device peak.

    python benchmarks/module_step.py [--steps 8] [--device cpu|cuda] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.workdir is not None:
        run(args, Path(args.workdir))
        return
    with tempfile.TemporaryDirectory(prefix="lema-module-") as work:  # removed afterwards
        run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    import torch

    from lema import LemaConfig, LemaModel
    from lema.cli.demo_cmd import build_base_model, demo_assets
    from lema.data.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_assets())
    weights = build_base_model(work / "base", tok, "tiny", seed=0)
    config = LemaConfig(gbi_path=str(weights), model_name_or_path=str(work / "base"), device=args.device,
                        lora_rank=4, batch_size=2, max_seq_len=96, seed=1)
    ids = torch.randint(0, 250, (2, 96), generator=torch.Generator().manual_seed(0))
    stepper, module = LemaModel(config), LemaModel(config)
    for m in (stepper, module):
        m.initialize_lora()
    trainer = stepper.get_trainer(torch.optim.AdamW(stepper.get_trainable_parameters(), lr=1e-3, weight_decay=0.0))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.0)

    def module_step() -> None:
        module(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()

    kinds = {"trainer.train_step": lambda: trainer.train_step(ids), "module loss.backward()": module_step}
    models = {"trainer.train_step": stepper, "module loss.backward()": module}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    peaks: dict[str, int] = {}
    for step in range(args.steps + 1):  # the first round warms up
        for name, run in kinds.items():
            models[name].device.synchronize()
            t = time.perf_counter()
            run()
            models[name].device.synchronize()
            if step:
                times[name].append(time.perf_counter() - t)
            peaks[name] = max(peaks.get(name, 0), models[name].last_report.device_peak_bytes)
    for m in (stepper, module):
        m.close()
    for name, values in times.items():
        print(f"{name:>24}: median {statistics.median(values) * 1e3:8.1f} ms   device peak {peaks[name]:,} bytes")
    a, b = (statistics.median(v) for v in times.values())
    print(f"{'ratio module / step':>24}: {b / a:.3f}")
    diff = max(float((p.detach() - q.detach()).norm() / q.detach().norm().clamp_min(1e-30))
               for p, q in zip(module.parameters(), stepper.parameters()))
    print(f"{'adapter difference':>24}: {diff:.3g} (relative, largest tensor)")


if __name__ == "__main__":
    main()
