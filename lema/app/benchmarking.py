"""Side-by-side step-time benchmarks: LEMA STREAMING / RESIDENT / AUTO vs transformers + peft.

Every number of one result is measured in the same process on the same batch, so the
ratios are meaningful on any machine; absolute times are only this machine's. Used by
``lema bench`` and ``benchmarks/train_bench.py``.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

# ~100M parameters, Llama-shaped (the benchmark model).
PRESETS: dict[str, dict[str, Any]] = {
    "100m": {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 10,
             "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 16000,
             "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "tiny": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
             "max_position_embeddings": 512, "tie_word_embeddings": False},
}


@attrs.frozen(kw_only=True)
class BenchSettings:
    """What to measure. ``model`` is a HF folder or None to build ``preset`` in ``workdir``."""

    workdir: Path
    model: Path | None = None
    preset: str = "100m"
    dtype: str = "bfloat16"
    batch: int = 4
    seq: int = 256
    steps: int = 3
    warmup: int = 1
    rank: int = 16
    device: str = "cpu"
    strategies: tuple[str, ...] = ("streaming", "resident")
    reference: bool = True
    prefetch: int = 2


def build_model(settings: BenchSettings) -> tuple[Path, Path]:
    """A random-init HF folder and its monolithic LEMA file (reused when present)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lema.app.convert import prepare_monolithic_safetensors

    folder = settings.workdir / f"{settings.preset}-{settings.dtype}"
    mono = settings.workdir / f"{settings.preset}-{settings.dtype}.safetensors"
    if not (folder / "config.json").is_file():
        cfg = dict(PRESETS[settings.preset])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, settings.dtype))
        model.save_pretrained(folder)
        del model
    if not mono.is_file():
        prepare_monolithic_safetensors(str(folder), str(mono), device="cpu")
    return folder, mono


def _batch(settings: BenchSettings, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (settings.batch, settings.seq), generator=torch.Generator().manual_seed(0))


def _timed(step: Callable[[], float], settings: BenchSettings, sync: Callable[[], None]) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for i in range(settings.warmup + settings.steps):
        sync()
        start = time.perf_counter()
        losses.append(step())
        sync()
        if i >= settings.warmup:
            times.append(time.perf_counter() - start)
    return times, losses


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _reset_peak(device: str) -> int:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def time_lema(settings: BenchSettings, mono: Path, strategy: str) -> dict[str, Any]:
    """Median step time and memory of LEMA with one strategy."""
    from lema import LemaConfig, LemaModel

    base = _reset_peak(settings.device)
    config = LemaConfig(gbi_path=str(mono), device=settings.device, strategy=strategy, lora_rank=settings.rank,
                        batch_size=settings.batch, max_seq_len=settings.seq, prefetch_distance=settings.prefetch)
    model = LemaModel(config)
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4))
    ids = _batch(settings, model.spec.vocab_size)
    reports = []

    def step() -> float:
        _, loss = trainer.train_step(ids)
        reports.append(model.last_report)
        return loss

    cpu_peak = None
    if not settings.device.startswith("cuda"):
        # One untimed step with every CPU allocation counted (the optimizer states it creates
        # stay counted); counting costs time, so the timed steps run without it.
        model.device.count_compute = True
        step()
        cpu_peak = model.device.peak_bytes()
        model.device.count_compute = False
        reports.clear()
    times, losses = _timed(step, settings, _sync(settings.device))
    measured = reports[settings.warmup:]
    peak = torch.cuda.max_memory_allocated() - base if cpu_peak is None else cpu_peak
    result = {
        "name": f"lema_{strategy}", "step_s": statistics.median(times), "step_times_s": times, "losses": losses,
        "bytes_uploaded_per_step": statistics.median(r.bytes_uploaded for r in measured),
        "wait_s": statistics.median(r.wait_seconds for r in measured),
        "compute_s": statistics.median(r.compute_seconds for r in measured),
        "device_peak_bytes": peak, "plan_device_total_bytes": model.plan().device_total,
    }
    model.engine.close()
    return result


def time_reference(settings: BenchSettings, folder: Path, checkpointing: bool) -> dict[str, Any]:
    """transformers + peft, fully in memory, same targets/rank/optimizer/batch."""
    import peft
    from transformers import AutoModelForCausalLM

    from lema.domain.families import registry as arch

    base = _reset_peak(settings.device)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, settings.dtype)).to(settings.device)
    if checkpointing:
        # transformers 5.2x renamed gradient_checkpointing_enable; accept both.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    family = arch.family_of(model.config.to_dict())
    lora = peft.LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0,
                           target_modules=list(arch.default_targets(family)), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = _batch(settings, model.config.vocab_size).to(settings.device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    times, losses = _timed(step, settings, _sync(settings.device))
    peak = (torch.cuda.max_memory_allocated() - base) if settings.device.startswith("cuda") else None
    return {"name": f"hf_peft_{'ckpt' if checkpointing else 'nockpt'}", "step_s": statistics.median(times),
            "step_times_s": times, "losses": losses, "device_peak_bytes": peak}


def link_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """Measured host->device bytes/s: pinned H2D on CUDA, a memcpy on the CPU device."""
    if device.startswith("cuda"):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    else:
        src = torch.empty(nbytes, dtype=torch.uint8)
        dst = torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)
    dst.fill_(0)
    times = []
    sync = _sync(device)
    for _ in range(5):
        sync()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def run(settings: BenchSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure everything ``settings`` asks for and return one JSON-able result."""
    settings.workdir.mkdir(parents=True, exist_ok=True)
    if settings.model is None:
        log(f"building the {settings.preset} model in {settings.workdir} ...")
        folder, mono = build_model(settings)
    else:
        from lema.app.convert import prepare_monolithic_safetensors

        folder = settings.model
        mono = settings.workdir / (folder.name + ".safetensors")
        if not mono.is_file():
            prepare_monolithic_safetensors(str(folder), str(mono), device="cpu")
    runs: list[dict[str, Any]] = []
    for strategy in settings.strategies:
        log(f"LEMA {strategy} ...")
        runs.append(time_lema(settings, mono, strategy))
    if settings.reference:
        for ckpt in (True, False):
            log(f"transformers + peft ({'with' if ckpt else 'without'} gradient checkpointing) ...")
            runs.append(time_reference(settings, folder, ckpt))
    bandwidth = link_bandwidth(settings.device)
    by_name = {r["name"]: r for r in runs}
    ratios = {}
    first = by_name.get(f"lema_{settings.strategies[0]}")
    for other in runs:
        if first is not None and other is not first:
            ratios[f"{first['name']}/{other['name']}"] = first["step_s"] / other["step_s"]
    for r in runs:
        if "bytes_uploaded_per_step" in r:
            r["link_floor_s"] = r["bytes_uploaded_per_step"] / bandwidth
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in attrs.asdict(settings).items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "link_bandwidth_Bps": bandwidth, "runs": runs, "ratios": ratios}
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A human table of one result."""
    from lema.domain.units import format_size

    lines = [f"{'run':<22}{'step s':>9}{'uploaded/step':>16}{'link floor s':>14}{'peak':>12}{'plan':>12}"]
    for r in result["runs"]:
        up = r.get("bytes_uploaded_per_step")
        lines.append(
            f"{r['name']:<22}{r['step_s']:>9.3f}"
            f"{format_size(int(up)) if up is not None else '-':>16}"
            f"{r.get('link_floor_s', float('nan')):>14.3f}"
            f"{format_size(int(r['device_peak_bytes'])) if r.get('device_peak_bytes') else '-':>12}"
            f"{format_size(int(r['plan_device_total_bytes'])) if r.get('plan_device_total_bytes') else '-':>12}"
        )
    lines.append(f"link bandwidth: {result['link_bandwidth_Bps'] / 1e9:.2f} GB/s")
    for name, value in result["ratios"].items():
        lines.append(f"ratio {name}: {value:.3f}")
    return lines


def dump(result: dict[str, Any], path: Path) -> None:
    from lema.adapters.checkpoints.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1))
