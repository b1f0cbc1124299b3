"""Issue #13's benchmark: the same model trained from its bf16 weights and from its NF4 weights.

Writes a random-init Llama-shaped bf16 model, converts it with ``lema convert --quantize nf4``
(``prepare_monolithic_safetensors(..., quantize="nf4")``), then trains LoRA on both files
with LEMA STREAMING, interleaving the two (one step of each per round), and prints from one
run: the median step time, the bytes uploaded per step (the engine's report), the planned
device peak, the host bytes RESIDENT would hold, and the nf4/bf16 ratios.

    python benchmarks/quant_bench.py [--steps 3] [--device cpu] [--hidden 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lema import LemaConfig, LemaModel  # noqa: E402
from lema.app.bootstrap import make_plan  # noqa: E402
from lema.app.tools.convert import prepare_monolithic_safetensors  # noqa: E402
from lema.domain.plan.strategy import MemoryStrategy  # noqa: E402
from lema.domain.units import format_size  # noqa: E402


def write_models(workdir: Path, hidden: int, layers: int, ffn: int, vocab: int) -> tuple[Path, Path, float]:
    """The bf16 model (a LEMA file) and its NF4 conversion; returns the conversion's seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    workdir.mkdir(parents=True, exist_ok=True)
    folder, bf16, nf4 = workdir / "hf", workdir / "bf16.safetensors", workdir / "nf4.safetensors"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                             num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                             vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    if not bf16.is_file():
        prepare_monolithic_safetensors(folder, bf16, device="cpu")
    start = time.perf_counter()
    if not nf4.is_file():
        prepare_monolithic_safetensors(folder, nf4, device="cpu", quantize="nf4")
    return bf16, nf4, time.perf_counter() - start


def make_model(path: Path, args: argparse.Namespace, strategy: str = "streaming") -> LemaModel:
    config = LemaConfig(gbi_path=str(path), device=args.device, lora_rank=16, batch_size=args.batch,
                        max_seq_len=args.seq, strategy=strategy, prefetch_distance=2)
    device = None
    if args.device == "cpu":  # counting every allocation costs a Python call per op: off for timing
        from lema.adapters.devices.cpu import CpuDevice

        device = CpuDevice(direct_reads=True, count_compute=False)
    model = LemaModel(config, device=device)
    model.initialize_lora()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lema-quant-bench"))
    args = parser.parse_args()
    torch.manual_seed(0)
    bf16, nf4, convert_s = write_models(args.workdir, args.hidden, args.layers, args.ffn, args.vocab)
    models = {"bf16": make_model(bf16, args), "nf4": make_model(nf4, args)}
    trainers = {k: m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-4)) for k, m in models.items()}
    vocab = models["bf16"].spec.vocab_size
    times: dict[str, list[float]] = {k: [] for k in models}
    dequant: list[float] = []
    reports = {}
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(step))
        for name in (("bf16", "nf4") if step % 2 == 0 else ("nf4", "bf16")):  # alternate who goes first
            dq = models[name].engine.dequantizer
            before = dq.seconds if dq is not None else 0.0
            start = time.perf_counter()
            trainers[name].train_step(ids)
            if args.device != "cpu":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
                if dq is not None:
                    dequant.append(dq.seconds - before)
            reports[name] = models[name].last_report
    rows = {}
    for name, model in models.items():
        resident_plan = make_plan(LemaConfig(gbi_path=str(model.config.gbi_path), device=args.device,
                                             strategy=MemoryStrategy.RESIDENT, lora_rank=16,
                                             batch_size=args.batch, max_seq_len=args.seq), model.spec, model.device)
        rows[name] = {
            "file_bytes": Path(model.config.gbi_path).stat().st_size,
            "step_s": statistics.median(times[name]),
            "bytes_uploaded_per_step": reports[name].bytes_uploaded,
            "planned_device_bytes": model.plan().device_total,
            "resident_host_bytes": resident_plan.host_total,
        }
        model.close()
    a, b = rows["nf4"], rows["bf16"]
    spec = models["bf16"].spec
    print(f"model: {spec.n_layers} layers, hidden {spec.hidden_size}, ffn {spec.intermediate_size}, vocab "
          f"{spec.vocab_size}, {spec.parameters / 1e6:.1f}M parameters; batch {args.batch} x {args.seq}; "
          f"LoRA rank 16 on all 7 projections; STREAMING, prefetch 2; {args.device}; "
          f"{args.steps} steps after {args.warmup} warm-up, interleaved; nf4 conversion {convert_s:.1f} s")
    print(f"{'':6s} {'file':>10s} {'step (median)':>14s} {'uploaded/step':>14s} {'plan (device)':>14s} "
          f"{'RESIDENT host':>14s}")
    for name, r in rows.items():
        print(f"{name:6s} {format_size(r['file_bytes']):>10s} {r['step_s']:>12.3f} s "
              f"{format_size(r['bytes_uploaded_per_step']):>14s} {format_size(r['planned_device_bytes']):>14s} "
              f"{format_size(r['resident_host_bytes']):>14s}")
    ratios = {key: a[key] / b[key] for key in ("file_bytes", "step_s", "bytes_uploaded_per_step",
                                               "planned_device_bytes", "resident_host_bytes")}
    print("nf4/bf16: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(f"nf4 dequantization: {statistics.median(dequant):.3f} s per step (median; host time, "
          f"{'the work itself on a CPU' if args.device == 'cpu' else 'kernel launches only on a GPU'})")
    print(json.dumps({"rows": rows, "ratios": ratios, "dequant_s": statistics.median(dequant)}))


if __name__ == "__main__":
    main()
