"""Issue 14's benchmark: step time with and without activation offload, one model, one run.

Trains a random Llama-shaped model (fp32 by default) for a few steps at a long sequence in
three configurations, on the same batch, in one process:

  (a) every checkpointed layer input on the device, whole layers (offload off);
  (b) activation offload, whole layers;
  (c) activation offload and sequence tiles: the device budget is set to the plan of
      (b) with tiles of a quarter of the sequence, so the planner itself picks the tiles.

For each it prints the median step time and its ratio to (a), how long the compute
waited for the link (weights and inputs), the device peak measured by
the CPU device's accounting next to the plan, and the bytes the link moves per step.
Timed steps run round-robin over the three (so load drifting on a shared machine slows
them alike), with allocation counting off (it costs a Python call per op); two more steps
per run, with counting on, give the peak. ``--link-bandwidth`` slows the CPU
device's simulated link to a PCIe-like rate (bytes/s) instead of memcpy speed.

    python benchmarks/long_context_bench.py [--seq 4096] [--steps 3] [--link-bandwidth 24e9] [--device cuda]

On a GPU (``--device cuda``) the peak is the CUDA allocator's, against a CUDA plan.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lema import LemaConfig, LemaModel  # noqa: E402
from lema.adapters.devices.cpu import CpuDevice  # noqa: E402
from lema.app import bootstrap  # noqa: E402
from lema.domain.plan.planner import plan  # noqa: E402
from lema.domain.units import format_size  # noqa: E402


def build(args: argparse.Namespace, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.model_files import save_monolithic

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq, 4096))
    dtype = getattr(torch, args.dtype)
    return save_monolithic(LlamaForCausalLM(cfg), folder / "model.safetensors", dtype=dtype)


def _model(path: Path, args: argparse.Namespace, count: bool, **overrides: object) -> tuple[LemaModel, object]:
    config = LemaConfig(gbi_path=str(path), device=args.device, lora_rank=args.rank, batch_size=1,
                        max_seq_len=args.seq, prefetch_distance=args.prefetch, seed=0, **overrides)  # type: ignore[arg-type]
    device = None  # CUDA: the one the config names; its allocator counts every byte
    if args.device == "cpu":
        device = CpuDevice(count_compute=count, record_timeline=False, link_bandwidth=args.link_bandwidth,
                           direct_reads=True)
    model = LemaModel(config, device=device)
    model.initialize_lora()
    return model, model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4))


def measure(path: Path, args: argparse.Namespace, batch: torch.Tensor, runs: dict[str, dict]) -> dict[str, dict]:
    """Time the runs' steps round-robin (a, b, c, a, b, c, ...), so that a machine whose load
    drifts slows them alike; then measure each run's peak with allocation counting on."""
    models = {name: _model(path, args, False, **overrides) for name, overrides in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    waits: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, (model, trainer) in models.items():
            model.device.synchronize()
            start = time.perf_counter()
            trainer.train_step(batch)
            model.device.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                waits[name].append(model.last_report.wait_seconds)
    out = {}
    for name, (model, _) in models.items():
        p, report = model.plan(), model.last_report
        model.close()
        del model
        if args.device != "cpu":
            torch.cuda.empty_cache()
        counted, trainer = _model(path, args, True, **runs[name])
        for _ in range(2):  # the optimizer's states exist from the second step on
            counted.device.reset_peak()
            trainer.train_step(batch)
        peak = counted.device.peak_bytes()
        counted.close()
        del counted, trainer
        out[name] = {"offload": p.offload_activations, "tile": p.tile_tokens, "step_s": statistics.median(times[name]),
                     "times": times[name], "wait_s": statistics.median(waits[name]), "peak": peak, "plan": p.device_total,
                     "activation_bytes": report.activation_bytes, "weight_bytes": report.bytes_uploaded,
                     "link_floor_s_24g": p.link_time_floor(24 * 1024**3)}
    return out


def cpu_model() -> str:
    """lscpu's model name and whether the CPU has AVX512-BF16 (from /proc/cpuinfo on Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{name}, {'AVX512-BF16' if 'avx512_bf16' in text else 'no AVX512-BF16'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--link-bandwidth", type=float, default=None, help="Simulated link, bytes/s (default: memcpy).")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the real link, peak VRAM against the plan.")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = build(args, Path(tmp))
        batch = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
        # (c)'s budget: the plan of offload with quarter-sequence tiles, so the planner picks tiles.
        probe = LemaModel(LemaConfig(gbi_path=str(path), device=args.device, lora_rank=args.rank,
                                     max_seq_len=args.seq, prefetch_distance=args.prefetch),
                          device=CpuDevice(count_compute=False) if args.device == "cpu" else None)
        import attrs

        shape = attrs.evolve(bootstrap.training_shape(probe.config, probe.spec, probe.device),
                             offload_activations=True, tile_tokens=args.seq // 4)
        budget = plan(probe.spec, shape).device_total
        probe.close()
        runs = measure(path, args, batch, {"a_inputs_on_device": {"offload_activations": False},
                                           "b_offload": {"offload_activations": True},
                                           "c_offload_tiles": {"vram_budget": budget}})
    base = runs["a_inputs_on_device"]["step_s"]
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, {args.dtype}; batch 1 x {args.seq}; "
          f"LoRA rank {args.rank}; prefetch {args.prefetch}; link "
          f"{'memcpy' if args.link_bandwidth is None else format_size(int(args.link_bandwidth)) + '/s (simulated)'}")
    print(f"{'run':22s} {'offload':>7s} {'tile':>6s} {'step':>8s} {'ratio':>6s} {'waited':>7s} {'peak':>11s} "
          f"{'plan':>11s} {'peak/plan':>9s} {'inputs moved':>13s}")
    for name, r in runs.items():
        print(f"{name:22s} {str(r['offload']):>7s} {r['tile']:>6d} {r['step_s']:7.2f}s {r['step_s'] / base:6.3f} "
              f"{r['wait_s']:6.2f}s "
              f"{format_size(r['peak']):>11s} {format_size(r['plan']):>11s} {r['peak'] / r['plan']:9.3f} "
              f"{format_size(r['activation_bytes']) + ' x2':>13s}")
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": vars(args) | {"json_out": None}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
