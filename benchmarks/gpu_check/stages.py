"""One stage of the GPU check: ``python -m benchmarks.gpu_check.stages STAGE --device cuda|cpu --out DIR``.

Each stage writes ``DIR/STAGE.json`` (``{"stage", "device", "status": "ok"|"failed"|"skipped",
"seconds", ...numbers}``) and exits 0 when its status is ok or skipped, 1 when failed.
``--device cpu`` runs the same code on a tiny model in seconds, so the script cannot rot
(``.ci/run`` calls it); ``--device cuda`` is the real check (Llama-2-7B shapes, 512 and 32k
tokens). Models are written with random weights under ``DIR/models`` (reused by later stages).

Stages: env, pytest_cuda, parity, link, stream7b, nf4, auto_vs_peft, long32k.
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
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30

# The shapes per device: the real check on a GPU, a tiny stand-in on the CPU.
SHAPES: dict[str, dict[str, Any]] = {
    "cuda": dict(model="llama-2-7b", dtype="bfloat16", seq=512, budget="8G", long_seq=32768, long_budget="8G",
                 steps=3, parity_hidden=512, parity_layers=4),
    "cpu": dict(model=None, dtype="float32", seq=32, budget=None, long_seq=256, long_budget=None, steps=1,
                parity_hidden=64, parity_layers=2),
}
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  hidden_act="silu")


class Skipped(Exception):
    """The stage cannot run here (a missing dependency); recorded, not a failure."""


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- models ------------------------------------------------------------------------------------------


def random_model(out: Path, device: str, dtype: str) -> Path:
    """The Llama-2-7B-shaped model (cuda) or a tiny Llama (cpu) with random weights, as a folder
    holding one monolithic safetensors file (written once, reused)."""
    from benchmarks.write_random_model import write_random_model
    from lema.adapters.weights.builtin_models import builtin_config

    name = SHAPES[device]["model"]
    folder = out / "models" / f"{name or 'tiny-llama'}-{dtype}"
    path = folder / "model.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        config = builtin_config(name) if name else dict(TINY_LLAMA)
        write_random_model(config, str(path), dtype)
        (folder / "config.json").write_text(json.dumps(dict(config, torch_dtype=dtype)), encoding="utf-8")
    return path


def lema_steps(path: Path, device: str, steps: int, seq: int, warmup: bool = True, **overrides: Any) -> dict[str, Any]:
    """``steps`` timed LEMA training steps (after one warm-up, unless not) at batch 1 x ``seq``:
    step time, bytes moved, the link floor, peaks next to the plan."""
    from lema import LemaConfig, LemaModel

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = LemaConfig(gbi_path=str(path), device=device, batch_size=1, max_seq_len=seq, lora_rank=16,
                        **overrides)
    model = LemaModel(config)
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4))
    ids = torch.randint(0, model.spec.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    times, reports, losses = [], [], []
    link = getattr(model.device, "link_bandwidth", None)
    if link is None and hasattr(model.device, "measure_link"):
        link = model.device.measure_link(nbytes=(256 << 20) if device == "cuda" else (8 << 20))[0]
    for i in range(steps + int(warmup)):
        _sync(device)
        start = time.perf_counter()
        _, loss = trainer.train_step(ids)
        _sync(device)
        if i or not warmup:
            times.append(time.perf_counter() - start)
            reports.append(model.last_report)
        losses.append(loss)
    plan = model.plan()
    step_s = statistics.median(times)
    moved = statistics.median(r.bytes_uploaded + 2 * r.activation_bytes for r in reports)
    floor = moved / link if link and moved else None
    out: dict[str, Any] = {
        "seq": seq, "strategy": str(config.strategy), "vram_budget": overrides.get("vram_budget"),
        "step_s": step_s, "step_times_s": times, "losses": losses,
        "bytes_uploaded_per_step": statistics.median(r.bytes_uploaded for r in reports),
        "link_Bps": link, "link_floor_s": floor, "step_over_floor": step_s / floor if floor else None,
        "plan_device_total_bytes": plan.device_total, "plan_fits": plan.fits,
        "resident_units": len(plan.resident_units), "tile_tokens": plan.tile_tokens,
        "offload_activations": plan.offload_activations,
        "peak_bytes": model.device.run_peak_bytes(),  # the engine resets the pass peak: the run's outlives it
    }
    if device == "cuda":
        reserved, allocated = model.device.run_peak_bytes(), torch.cuda.max_memory_allocated()
        out.update(peak_reserved_bytes=reserved, peak_allocated_bytes=allocated,
                   reserved_over_plan=reserved / plan.device_total, allocated_over_plan=allocated / plan.device_total)
    model.close()
    del model, trainer
    gc.collect()
    return out


def hf_llama(device: str, dtype: torch.dtype, folder: Path) -> Path:
    """A small transformers Llama with random weights saved in ``folder`` (the parity model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[device]
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=shape["parity_hidden"], intermediate_size=2 * shape["parity_hidden"],
                          num_hidden_layers=shape["parity_layers"], num_attention_heads=8, num_key_value_heads=4,
                          vocab_size=512, max_position_embeddings=1024)
        LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder)
    return folder


# -- the stages --------------------------------------------------------------------------------------


def stage_env(args: argparse.Namespace) -> dict[str, Any]:
    versions = {}
    from importlib import metadata

    for name in ("torch", "transformers", "peft", "safetensors", "attrs", "click", "bitsandbytes", "lema"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    out: dict[str, Any] = {"versions": versions, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        out.update(gpu=props.name, gpu_memory_bytes=total, free_bytes=free,
                   capability=list(torch.cuda.get_device_capability(0)))
    return out


def stage_pytest_cuda(args: argparse.Namespace) -> dict[str, Any]:
    # On the CPU the CUDA tests skip; run only the CUDA device's file there, to stay quick.
    paths = [] if args.device == "cuda" else ["tests/unit/adapters/devices/test_cuda_device.py"]
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *paths]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m cuda exited {proc.returncode}:\n{tail}")
    return {"command": " ".join(cmd), "exit": proc.returncode, "summary": tail.strip().splitlines()[-1:]}


def stage_parity(args: argparse.Namespace) -> dict[str, Any]:
    """Logits and 3 AdamW steps of LoRA against transformers + peft, in fp32 and bf16."""
    import peft
    from transformers import AutoModelForCausalLM

    from lema import LemaConfig, LemaModel

    out: dict[str, Any] = {}
    dev = torch.device(args.device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # bounds: relative to the largest logit, and to the norm of all the adapters' updates
    for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        name = str(dtype).removeprefix("torch.")
        folder = hf_llama(args.device, dtype, Path(args.out) / "models" / f"parity-{name}")
        ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(dev)
        with torch.no_grad():
            ref_logits = hf(input_ids=ids.to(dev)).logits.float().cpu()
        lema = LemaModel(LemaConfig(model_name_or_path=str(folder), device=args.device, lora_rank=8, lora_alpha=16,
                                    lora_dropout=0.0, batch_size=2, max_seq_len=64, max_grad_norm=None, seed=3))
        logits = lema.logits(ids).float().cpu()
        logit_error = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
        lema.initialize_lora()
        init = {k: v.detach().clone() for k, v in lema.require_lora().state_dict_peft(lema.spec).items()}
        ref = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                      task_type="CAUSAL_LM"))
        peft.set_peft_model_state_dict(ref, {k: v.to(dev) for k, v in init.items()})
        ref.train()
        ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3)
        trainer = lema.get_trainer(torch.optim.AdamW(lema.get_trainable_parameters(), lr=1e-3))
        for step in range(3):
            batch = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(10 + step))
            ref(input_ids=batch.to(dev), labels=batch.to(dev)).loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            trainer.train_step(batch)
        mine = lema.require_lora().state_dict_peft(lema.spec)
        theirs = peft.get_peft_model_state_dict(ref)
        delta = [(mine[k].float().cpu() - init[k].float().cpu(), theirs[k].float().cpu() - init[k].float().cpu())
                 for k in mine]
        a, b = torch.cat([d[0].flatten() for d in delta]), torch.cat([d[1].flatten() for d in delta])
        update_error = float((a - b).norm() / b.norm().clamp_min(1e-12))  # over all the adapters' updates
        out[name] = {"logits_rel_error": logit_error, "adamw3_update_rel_error": update_error, "bound": bound,
                     "ok": logit_error <= bound and update_error <= 2 * bound}
        lema.close()
        del hf, ref, lema
        gc.collect()
    if not all(v["ok"] for v in out.values()):
        raise RuntimeError(f"LEMA differs from transformers + peft: {json.dumps(out)}")
    return out


def stage_link(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cuda":
        from lema.adapters.devices.cuda import CudaDevice

        pinned, pageable = CudaDevice(0).measure_link(nbytes=1 << 30)
    else:
        from lema.adapters.devices.cpu import CpuDevice

        pinned, pageable = CpuDevice().measure_link(nbytes=16 << 20, repeat=3)
    return {"pinned_Bps": pinned, "pageable_Bps": pageable, "pinned_GBps": pinned / 1e9,
            "pageable_GBps": pageable / 1e9}


def stage_stream7b(args: argparse.Namespace) -> dict[str, Any]:
    """STREAMING at batch 1 x seq under a budget the model does not fit: step vs the link floor,
    peaks vs ``lema plan``. Targets on a GPU: step <= 1.15 x floor, reserved within 10 % of plan."""
    shape = SHAPES[args.device]
    path = random_model(Path(args.out), args.device, shape["dtype"])
    budget = shape["budget"]
    extra = {"vram_budget": budget} if budget else {"vram_budget": _tiny_budget(path, args.device, shape["seq"])}
    out = lema_steps(path, args.device, shape["steps"], shape["seq"], strategy="streaming", **extra)
    out["model_bytes"] = path.stat().st_size
    if args.device == "cuda":
        out["targets"] = {"step_over_floor<=1.15": (out["step_over_floor"] or 99) <= 1.15,
                          "reserved_within_10pct_of_plan": abs(out["reserved_over_plan"] - 1) <= 0.10}
    return out


def _tiny_budget(path: Path, device: str, seq: int) -> int:
    """A budget for the tiny CPU stand-in: the STREAMING plan and a fifth for the plan's error
    (the CPU device then streams through counted slots, as a GPU with a budget does)."""
    from lema import LemaConfig, LemaModel

    with LemaModel(LemaConfig(gbi_path=str(path), device=device, batch_size=1, max_seq_len=seq, lora_rank=16,
                              strategy="streaming", vram_budget=1 << 30)) as probe:  # a budget: weights in slots
        return int(probe.plan().device_total * 1.2)


def stage_nf4(args: argparse.Namespace) -> dict[str, Any]:
    """The same model in NF4 (``lema convert --quantize nf4``): bytes per step <= 0.35 x bf16's."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise Skipped(f"bitsandbytes is not importable ({type(exc).__name__}: {exc}); put its wheel in "
                      "benchmarks/wheels/ (gpu_check.sh installs it from there, offline)") from None
    shape = SHAPES[args.device]
    path = random_model(Path(args.out), args.device, shape["dtype"])
    quantized = path.parent.with_name(path.parent.name + "-nf4.safetensors")
    if not quantized.is_file():
        cmd = [sys.executable, "-m", "lema.cli", "convert", str(path.parent), str(quantized), "--quantize", "nf4",
               "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode or not quantized.is_file():
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    budget = shape["budget"] or _tiny_budget(path, args.device, shape["seq"])
    nf4 = lema_steps(quantized, args.device, shape["steps"], shape["seq"], strategy="streaming", vram_budget=budget)
    dense = lema_steps(path, args.device, 1, shape["seq"], strategy="streaming", vram_budget=budget)
    ratio = nf4["bytes_uploaded_per_step"] / max(dense["bytes_uploaded_per_step"], 1)
    return {"nf4": nf4, "bf16_bytes_uploaded_per_step": dense["bytes_uploaded_per_step"],
            "bytes_ratio": ratio, "targets": {"bytes_ratio<=0.35": ratio <= 0.35}}


def stage_auto_vs_peft(args: argparse.Namespace) -> dict[str, Any]:
    """AUTO with the whole device against transformers + peft (gradient checkpointing) on the same model."""
    import peft
    from transformers import AutoModelForCausalLM

    shape = SHAPES[args.device]
    path = random_model(Path(args.out), args.device, shape["dtype"])
    lema = lema_steps(path, args.device, shape["steps"], shape["seq"], strategy="auto")
    dev = torch.device(args.device)
    dtype = getattr(torch, shape["dtype"])
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        hf = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype).to(dev)
    except torch.OutOfMemoryError:
        return {"lema_auto": lema, "peft": "does not fit"}
    hf.gradient_checkpointing_enable()
    hf.enable_input_require_grads()
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj", "gate_proj",
                                                                                       "up_proj", "down_proj"],
                                                  task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, hf.config.vocab_size, (1, shape["seq"]), generator=torch.Generator().manual_seed(0)).to(dev)
    times = []
    for i in range(shape["steps"] + 1):
        _sync(args.device)
        start = time.perf_counter()
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        _sync(args.device)
        if i:
            times.append(time.perf_counter() - start)
    out = {"lema_auto": lema, "peft_step_s": statistics.median(times),
           "lema_over_peft": lema["step_s"] / statistics.median(times)}
    if args.device == "cuda":
        out["peft_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def stage_long32k(args: argparse.Namespace) -> dict[str, Any]:
    """7B at 32k tokens under an 8 GiB budget: the plan fits (tiles + offload) and one step runs within it."""
    shape = SHAPES[args.device]
    path = random_model(Path(args.out), args.device, shape["dtype"])
    seq = shape["long_seq"]
    budget = shape["long_budget"] or _tiny_budget(path, args.device, seq)
    out = lema_steps(path, args.device, 1, seq, warmup=False, strategy="streaming", vram_budget=budget)
    if args.device == "cuda":
        out["targets"] = {"peak_reserved<=8GiB": out["peak_reserved_bytes"] <= 8 * GiB}
    return out


STAGES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": stage_env, "pytest_cuda": stage_pytest_cuda, "parity": stage_parity, "link": stage_link,
    "stream7b": stage_stream7b, "nf4": stage_nf4, "auto_vs_peft": stage_auto_vs_peft, "long32k": stage_long32k,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"stage": args.stage, "device": args.device}
    start = time.perf_counter()
    try:
        record.update(STAGES[args.stage](args))
        record["status"] = "ok"
    except Skipped as exc:
        record.update(status="skipped", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a stage's failure is its record
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    record["seconds"] = time.perf_counter() - start
    target = Path(args.out) / f"{args.stage}.json"
    target.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    print(json.dumps({k: v for k, v in record.items() if k != "traceback"}, default=str)[:2000], flush=True)
    return 0 if record["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
