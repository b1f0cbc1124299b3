"""Side-by-side step-time benchmarks: LEMA STREAMING / RESIDENT vs transformers + peft, and the floor.

Every number of one result is measured in the same process on the same batch, so the ratios
are meaningful on any machine; absolute times are only this machine's (``lema bench``).

The floor of a streamed step is ``max(link floor, compute alone)``: the bytes a step
uploads over the measured host -> device bandwidth, and the step time with every weight
already on the device (LEMA's AUTO strategy with no budget: nothing crosses the link). A
step near its floor overlaps reads, uploads and compute instead of adding them.
"""

from __future__ import annotations

import functools
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

PRESETS: dict[str, dict[str, Any]] = {  # ~100M parameters, Llama-shaped (the benchmark model)
    "100m": {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 10,
             "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 16000,
             "max_position_embeddings": 2048, "tie_word_embeddings": False},
    # a second size for the step-time model's checks (issue 27): ~30M parameters
    "30m": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
            "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 16000,
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
    prefetch: int | None = None  # None: the config's "auto" (AUTO chooses the depth, others read 2 ahead)
    read_bytes: int = 0  # also time LEMA's reader against a sequential read of a file this big (0: skip)
    link_bandwidth: float | None = None  # simulate a link of this many bytes/s (CPU device only)
    trace: bool = False  # count every allocation and keep the event timeline in the timed steps
    compute_alone: bool = True  # also time the step with every weight resident (the compute floor)
    schedule: str = "round-robin"  # or "sequential" (one run at a time: what a GPU's memory allows)
    vram: str | None = None  # a device budget for the LEMA runs ("64M"): slotted under it (AUTO: resident what fits)
    predict: bool = True  # calibrate the rates (lema plan --calibrate's measurement) and predict each LEMA step


def build_model(settings: BenchSettings) -> tuple[Path, Path]:
    """A random-init HF folder and its monolithic LEMA file (reused when present)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lema.app.tools.convert import prepare_monolithic_safetensors

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


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _reset_peak(device: str) -> int:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def make_device(settings: BenchSettings, budget: bool = True) -> Any:
    """The device a LEMA run of the bench uses (a fresh one per run; ``budget=False``: without
    ``settings.vram``, for compute alone)."""
    if settings.device.startswith("cuda"):
        from lema.adapters.devices.cuda import CudaDevice

        index = int(settings.device.split(":")[1]) if ":" in settings.device else 0
        device = CudaDevice(index, record_timeline=settings.trace)
        device.measure_link()
        return device
    from lema.adapters.devices.cpu import CpuDevice

    # No simulated link: the CPU trains as LemaModel runs it without a budget, on the weights
    # where the host holds them (nothing crosses a link). With one, each unit is read into its
    # slot and handed over after the link's time, as a GPU's host reads and its copy engine moves.
    from lema.domain.units import parse_size

    capacity = None if settings.vram is None or not budget else parse_size(settings.vram, field="--vram")
    return CpuDevice(capacity=capacity, link_bandwidth=settings.link_bandwidth, direct_reads=True,
                     in_place=settings.link_bandwidth is None and capacity is None, count_compute=settings.trace,
                     record_timeline=settings.trace)


class LemaRun:
    """One LEMA strategy, built once, stepped on demand ("compute_alone": AUTO with no budget,
    so every layer stays on the device and nothing crosses the link)."""

    def __init__(self, settings: BenchSettings, mono: Path, strategy: str, rates: Any = None) -> None:
        from lema import LemaConfig, LemaModel

        self.settings = settings
        self.rates = rates
        self.base = _reset_peak(settings.device)
        self.alone = strategy == "compute_alone"
        self.name = "lema_compute_alone" if self.alone else f"lema_{strategy}"
        config = LemaConfig(gbi_path=str(mono), device=settings.device, strategy="auto" if self.alone else strategy,
                            lora_rank=settings.rank, batch_size=settings.batch, max_seq_len=settings.seq,
                            prefetch_distance="auto" if settings.prefetch is None else settings.prefetch,
                            vram_budget=None if self.alone else settings.vram)
        self.model = model = LemaModel(config, device=make_device(settings, budget=not self.alone))
        model.initialize_lora()
        self.trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4))
        self.ids = _batch(settings, model.spec.vocab_size)
        self.reports: list[Any] = []
        self.cpu_peak = None
        if not settings.device.startswith("cuda"):
            # One untimed step with every CPU allocation counted (the optimizer states it creates
            # stay counted); counting costs time, so the timed steps run without it (unless --trace).
            model.device.count_compute = True
            self.step()
            self.cpu_peak = model.device.peak_bytes()
            model.device.count_compute = settings.trace
            self.reports.clear()

    def step(self) -> float:
        _, loss = self.trainer.train_step(self.ids)
        self.reports.append(self.model.last_report)
        return loss

    def finish(self, times: list[float], losses: list[float]) -> dict[str, Any]:
        settings, model = self.settings, self.model
        measured = self.reports[settings.warmup:]
        peak = torch.cuda.max_memory_allocated() - self.base if self.cpu_peak is None else self.cpu_peak
        result = {
            "name": self.name, "step_s": statistics.median(times), "step_times_s": times, "losses": losses,
            "bytes_uploaded_per_step": statistics.median(r.bytes_uploaded for r in measured),
            "bytes_read_per_step": statistics.median(r.bytes_read for r in measured),
            "wait_s": statistics.median(r.wait_seconds for r in measured),
            "compute_s": statistics.median(r.compute_seconds for r in measured),
            "device_peak_bytes": peak, "plan_device_total_bytes": model.plan().device_total,
            "resident_units": len(model.plan().resident_units), "kept_layers": model.plan().kept_layers,
            "prefetch": model.plan().shape.prefetch,
            "adapters": [p.detach().float().clone() for p in model.get_trainable_parameters()],
        }
        if self.rates is not None:
            from lema.domain.plan.timing import predict

            predicted = predict(model.plan(), model.spec, self.rates)
            result["predicted_s"] = predicted.step_seconds
            result["predicted_over_measured"] = predicted.step_seconds / result["step_s"]
            fixed = predicted.fixed_seconds
            result["predicted_bound"] = f"{predicted.bound} ({predicted.share:.0%}), fixed cost {fixed:.3g} s"
        if settings.trace:
            result["timeline"] = [list(map(str, e)) for e in measured[-1].timeline]
        model.close()
        return result


class ReferenceRun:
    """transformers + peft, fully in memory, same targets/rank/optimizer/batch."""

    def __init__(self, settings: BenchSettings, folder: Path, checkpointing: bool) -> None:
        import peft
        from transformers import AutoModelForCausalLM

        from lema.domain.families import registry as arch

        self.settings = settings
        self.name = f"hf_peft_{'ckpt' if checkpointing else 'nockpt'}"
        self.base = _reset_peak(settings.device)
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
        self.model = peft.get_peft_model(model, lora)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.ids = _batch(settings, self.model.config.vocab_size).to(settings.device)

    def step(self) -> float:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def finish(self, times: list[float], losses: list[float]) -> dict[str, Any]:
        peak = (torch.cuda.max_memory_allocated() - self.base) if self.settings.device.startswith("cuda") else None
        del self.model, self.optimizer, self.params
        return {"name": self.name, "step_s": statistics.median(times), "step_times_s": times, "losses": losses,
                "device_peak_bytes": peak}


def measure_runs(settings: BenchSettings, makers: list[Callable[[], Any]], log: Callable[[str], None]
                 ) -> list[dict[str, Any]]:
    """Time every run: one after another ("sequential", what a GPU's memory allows), or all
    built first and stepped in turn ("round-robin", so a load change on a shared machine hits
    every run alike)."""
    sync = _sync(settings.device)

    def timed(run: Any) -> tuple[float, float]:
        sync()
        start = time.perf_counter()
        loss = run.step()
        sync()
        return time.perf_counter() - start, loss

    results = []
    if settings.schedule == "sequential":
        for make in makers:
            run = make()
            log(f"{run.name} ...")
            samples = [timed(run) for _ in range(settings.warmup + settings.steps)]
            results.append(run.finish([s for s, _ in samples[settings.warmup:]], [loss for _, loss in samples]))
        return results
    runs = []
    for make in makers:
        runs.append(make())
        log(f"built {runs[-1].name}")
    samples: dict[str, list[tuple[float, float]]] = {run.name: [] for run in runs}
    for i in range(settings.warmup + settings.steps):
        log(f"round {i + 1} of {settings.warmup + settings.steps}" + (" (warm-up)" if i < settings.warmup else ""))
        for run in runs:
            samples[run.name].append(timed(run))
    for run in runs:
        s = samples[run.name]
        results.append(run.finish([t for t, _ in s[settings.warmup:]], [loss for _, loss in s]))
    return results


def link_bandwidth(settings: BenchSettings) -> tuple[float, float]:
    """Measured host -> device bytes/s from pinned and from pageable memory (the simulated
    bandwidth on a CPU device given one; a memcpy on the CPU otherwise)."""
    device = make_device(settings)
    try:
        return device.measure_link()
    finally:
        device.close()


def run(settings: BenchSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure everything ``settings`` asks for and return one JSON-able result."""
    from lema.app.tools.bench_rates import compare_adapters

    settings.workdir.mkdir(parents=True, exist_ok=True)
    if settings.model is None:
        log(f"building the {settings.preset} model in {settings.workdir} ...")
        folder, mono = build_model(settings)
    else:
        from lema.app.tools.convert import prepare_monolithic_safetensors

        folder = settings.model
        mono = settings.workdir / (folder.name + ".safetensors")
        if not mono.is_file():
            prepare_monolithic_safetensors(str(folder), str(mono), device="cpu")
    reads = None
    if settings.read_bytes:
        from lema.app.tools import read_bench
        from lema.app.bootstrap import weight_readers

        readers = weight_readers()
        log(f"reads: a {settings.read_bytes >> 20} MiB file, sequential vs {readers} reader threads ...")
        blob = read_bench.make_file(settings.workdir / "read-bench.bin", settings.read_bytes)
        reads = read_bench.measure(blob, threads=readers)
    pinned, pageable = link_bandwidth(settings)
    log(f"link: {pinned / 1e9:.2f} GB/s pinned, {pageable / 1e9:.2f} GB/s pageable")
    names = list(settings.strategies) + (["compute_alone"] if settings.compute_alone else [])
    rates = None
    if settings.predict:
        from lema.app.tools.bench_rates import measure_rates

        rates = measure_rates(settings, mono, make_device(settings))
        log(f"rates: {rates.source}: matmul {rates.matmul_flops_per_s / 1e9:.1f} GFLOP/s, attention "
            f"{rates.attention_flops_per_s / 1e9:.1f} GFLOP/s, memory {rates.memory_bytes_per_s / 1e9:.2f} GB/s, "
            f"link {rates.link_bytes_per_s / 1e9:.2f} GB/s")
    makers: list[Callable[[], Any]] = [functools.partial(LemaRun, settings, mono, s, rates) for s in names]
    if settings.reference:
        makers += [functools.partial(ReferenceRun, settings, folder, ckpt) for ckpt in (True, False)]
    runs = measure_runs(settings, makers, log)
    by_name = {r["name"]: r for r in runs}
    alone = by_name.get("lema_compute_alone")
    for r in runs:
        if "bytes_uploaded_per_step" in r:
            r["link_floor_s"] = r["bytes_uploaded_per_step"] / pinned
            if alone is not None and r is not alone:
                r["floor_s"] = max(r["link_floor_s"], alone["step_s"])
                r["step_over_floor"] = r["step_s"] / r["floor_s"]
    ratios = {}
    first = by_name.get(f"lema_{settings.strategies[0]}")
    compare_adapters(runs, first)
    for other in runs:
        if first is not None and other is not first and other is not alone:
            ratios[f"{first['name']}/{other['name']}"] = first["step_s"] / other["step_s"]
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in attrs.asdict(settings).items()},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": machine(settings.device),
            "link_bandwidth_Bps": pinned, "link_bandwidth_pageable_Bps": pageable, "runs": runs, "ratios": ratios,
            "reads": reads}


def machine(device: str) -> str:
    """One line naming the hardware the numbers come from."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        cpu = f"{names[0] if names else cpu}, {len(names)} cores" + (", AVX512-BF16" if "avx512_bf16" in info else "")
    except OSError:
        pass
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}; host {cpu}"
    return cpu


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A human table of one result."""
    from lema.domain.units import format_size

    lines = [f"machine: {result.get('machine', '?')}; torch {result['torch']}, {result['threads']} threads",
             f"link: {result['link_bandwidth_Bps'] / 1e9:.2f} GB/s pinned, "
             f"{result.get('link_bandwidth_pageable_Bps', float('nan')) / 1e9:.2f} GB/s pageable",
             f"{'run':<22}{'step s':>9}{'predicted s':>12}{'pred/meas':>10}{'uploaded/step':>15}"
             f"{'link floor s':>14}{'step/floor':>12}{'peak':>12}{'plan':>12}"]
    for r in result["runs"]:
        up = r.get("bytes_uploaded_per_step")
        ratio = r.get("step_over_floor")
        lines.append(
            f"{r['name']:<22}{r['step_s']:>9.3f}"
            f"{r.get('predicted_s', float('nan')):>12.3f}{r.get('predicted_over_measured', float('nan')):>10.3f}"
            f"{format_size(int(up)) if up is not None else '-':>15}"
            f"{r['link_floor_s'] if 'link_floor_s' in r else float('nan'):>14.3f}"
            f"{ratio if ratio is not None else float('nan'):>12.3f}"
            f"{format_size(int(r['device_peak_bytes'])) if r.get('device_peak_bytes') else '-':>12}"
            f"{format_size(int(r['plan_device_total_bytes'])) if r.get('plan_device_total_bytes') else '-':>12}"
        )
    lines.append("step/floor = step / max(link floor, compute alone); compute alone = every weight on the device")
    lines.append("predicted = lema/domain/plan/timing.py at this machine's measured rates (as `lema plan --calibrate`)")
    for r in result["runs"]:
        if "kept_layers" in r or "adapters_max_rel_diff" in r:
            lines.append(f"{r['name']}: kept activations {r.get('kept_layers', '-')} layers, "
                         f"{r.get('resident_units', '-')} units resident, prefetch {r.get('prefetch', '-')}"
                         + (f", bound {r['predicted_bound']}" if "predicted_bound" in r else "")
                         + (f", adapters vs the first run: max relative difference {r['adapters_max_rel_diff']:.3g}"
                            if "adapters_max_rel_diff" in r else ""))
    for name, value in result["ratios"].items():
        lines.append(f"ratio {name}: {value:.3f}")
    reads = result.get("reads")
    if reads:
        lines.append(f"reads of a page-cached {format_size(reads['bytes'])} file: sequential "
                     f"{reads['sequential_Bps'] / 1e9:.2f} GB/s, LEMA's reader ({reads['threads']} threads) "
                     f"{reads['parallel_Bps'] / 1e9:.2f} GB/s = {reads['ratio']:.2f}x")
    return lines


def dump(result: dict[str, Any], path: Path) -> None:
    from lema.adapters.checkpoints.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1))
