"""``lema plan --model PATH --vram 8G``: will this LoRA run fit, and if not, what would.

Reads only the model's header or config (never a weight byte), so it answers in well
under two seconds for any size of model. Exit status: 0 fits (or no budget to judge
against), 1 does not fit (the message says what would), 2 bad input.
"""

from __future__ import annotations

import json

import click

from lema.errors import ConfigError, DoesNotFitError

DEFAULT_BANDWIDTH = "24G"  # bytes/s: PCIe 4.0 x16 host -> device from pinned memory, roughly


@click.command("plan")
@click.option("--model", "model", metavar="PATH|NAME", help="A .safetensors file, an index.json, a Hugging Face "
              "folder, a config.json, a built-in name (see --list-models) or a Hub id.")
@click.option("--vram", metavar="SIZE", help="Device memory budget, e.g. 8G (binary units). "
              "Default: the local GPU's total memory; without a GPU, no verdict.")
@click.option("--ram", metavar="SIZE", help="Host RAM budget, e.g. 32G (default: not checked).")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences per step.")
@click.option("--seq", type=int, default=512, show_default=True, help="Tokens per sequence.")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--targets", metavar="A,B,...", help="LoRA target modules (default: the family's; 'all-linear').")
@click.option("--strategy", default="streaming", show_default=True, help="streaming, resident or auto.")
@click.option("--prefetch", type=click.IntRange(min=0), default=None,
              help="Layers fetched ahead (slots = prefetch + 1); default: with --strategy auto the plan chooses "
                   "0..4 by predicted step time (a 'chose: prefetch' line says why), otherwise 2.")
@click.option("--dtype", metavar="DTYPE", help="Plan at this dtype (float16, bfloat16, float32); default: the file's.")
@click.option("--quantize", type=click.Choice(["nf4", "fp4", "int8"]), default=None,
              help="Plan the model as if its linear weights were quantized (what `lema convert --quantize` writes).")
@click.option("--no-double-quant", is_flag=True, help="With --quantize nf4/fp4: without double quantization.")
@click.option("--config", "config_path", metavar="PATH", help="A config.json to use instead of the model's own.")
@click.option("--device", "device_kind", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="Plan for this device (sets the runtime reserve and the attention path); "
              "auto: cuda when a GPU is visible, else cpu, as `lema train` picks.")
@click.option("--mode", default="train", show_default=True, help="train, or inference (forward only).")
@click.option("--no-checkpointing", is_flag=True, help="Plan without gradient checkpointing.")
@click.option("--offload-activations/--no-offload-activations", "offload", default=None,
              help="Keep the checkpointed layer inputs in host memory between each layer's forward and backward "
                   "(default: on when the run needs it to fit).")
@click.option("--reserve", metavar="SIZE", help="Runtime reserve (default 512M on cuda, 0 on cpu).")
@click.option("--bandwidth", default=DEFAULT_BANDWIDTH, show_default=True, metavar="SIZE[/s]",
              help="Host -> device bandwidth for the link time floor (assumed PCIe 4.0 x16).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel ranks on this machine (torchrun --nproc-per-node): device memory is per "
                   "rank (--batch per rank), host memory for all of them.")
@click.option("--calibrate", is_flag=True,
              help="Measure this machine's link, matmul, attention and memory rates at the run's dtype and shapes "
                   "(a few seconds), and the sustained read rate of the drive holding the model's file (up to "
                   "24 GiB or 15 s), for the predicted step time, and cache them (under $LEMA_CACHE, default "
                   "~/.cache/lema). Without it the plan uses a cached calibration of the same run, else the device "
                   "kind's stated defaults, and says which.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--list-models", is_flag=True, help="List the built-in model names and exit.")
def plan(model: str | None, vram: str | None, ram: str | None, batch: int, seq: int, rank: int,
         targets: str | None, strategy: str, prefetch: int | None, dtype: str | None, quantize: str | None,
         no_double_quant: bool, config_path: str | None, device_kind: str, mode: str, no_checkpointing: bool,
         offload: bool | None, reserve: str | None, bandwidth: str, nproc: int, calibrate: bool, as_json: bool,
         list_models: bool) -> None:
    """Plan the device and host memory of a LoRA run, and say whether it fits."""
    from lema.adapters.weights.model_files import (
        default_environment_allows_network,
        resolve_model,
    )
    from lema.domain.model.sequence_limit import check_seq
    from lema.domain.device_traits import DEVICE_KINDS
    from lema.domain.plan.inputs import DEFAULT_PREFETCH
    from lema.domain.plan.planner import Budget, TrainingShape
    from lema.domain.plan.planner import plan as make_plan
    from lema.domain.units import parse_size

    if list_models:
        _list_models(as_json)
        return
    if not model:
        raise ConfigError("--model is required: a .safetensors file, a folder, a config.json or a built-in name "
                          "(see `lema plan --list-models`)")
    link = parse_size(bandwidth.removesuffix("/s"), field="--bandwidth")
    device_kind, device_note = _device(device_kind)
    budget, budget_source = None, ""
    if vram is not None:
        budget, budget_source = Budget.from_strings(vram, ram), "--vram"
    elif ram is not None:
        raise ConfigError("--ram needs --vram too (the device budget); e.g. --vram 8G --ram 32G")
    shape = TrainingShape(batch=batch, seq=seq, lora_rank=rank, lora_targets=targets, strategy=strategy,
                          prefetch=DEFAULT_PREFETCH if prefetch is None else prefetch,
                          prefetch_auto=prefetch is None, dtype=dtype, gradient_checkpointing=not no_checkpointing,
                          device_kind=device_kind, mode=mode, offload_activations=offload,
                          reserve_bytes=None if reserve is None else _reserve(reserve), local_ranks=nproc,
                          # the CPU without a budget trains on the weights in place, as `lema train` runs it
                          weights_in_place=device_kind in DEVICE_KINDS and DEVICE_KINDS[device_kind].host_memory
                          and vram is None,
                          # as `lema train` plans AUTO (gradient_checkpointing="auto"): kept layers chosen by time
                          kept_layers=None if strategy.lower() == "auto" and not no_checkpointing and mode == "train"
                          else 0)
    resolved = resolve_model(model, config_path, allow_network=default_environment_allows_network())
    spec = resolved.spec
    if quantize is not None:
        from lema.domain.nn.quant import QuantFormat

        spec = spec.quantized(QuantFormat.parse(quantize, double_quant=not no_double_quant))
    elif no_double_quant:
        raise ConfigError("--no-double-quant needs --quantize nf4 or fp4")
    check_seq(seq, spec, lambda line: click.echo(line, err=True))
    if budget is None and device_kind == "cuda":
        from lema.adapters.devices.probe import local_gpu_memory

        gpu = local_gpu_memory()
        if gpu is not None:
            budget, budget_source = Budget(gpu[0]), gpu[1]
    rates = _rates(spec, shape, calibrate)
    result = make_plan(spec, shape, budget, rates)
    floor = result.link_time_floor(link)
    from lema.domain.plan.disk_time import with_disk
    from lema.domain.plan.timing import predict

    disk = _disk(spec, resolved, result, budget, calibrate)
    timing = with_disk(predict(result, spec, rates), disk, result, spec)
    if as_json:
        data = result.to_dict()
        data["source"] = {"ref": model, "kind": resolved.source_kind,
                          "path": None if resolved.weights_path is None else str(resolved.weights_path),
                          "note": resolved.note}
        data["budget_source"] = budget_source or None
        data["device_choice"] = device_note
        data["link"] = {"bandwidth_bytes_per_s": link, "time_floor_s": floor}
        data["time"] = timing.to_dict()
        if disk is not None and disk.keep is not None:
            data["disk"] = {"bytes_per_step": disk.bytes_per_step, "read_bytes_per_s": disk.read_rate,
                            "rate_source": disk.rate_source, "seconds": disk.seconds, "page_cache_kept": disk.keep,
                            "held_units": list(disk.held), "held_bytes": disk.held_bytes, "line": disk.line(
                                timing.compute_seconds)}
        click.echo(json.dumps(data, indent=2))
    else:
        _print_human(model, resolved, result, link, floor, budget_source, device_note)
        if disk is not None and disk.keep is not None:
            click.echo(disk.line(timing.compute_seconds))
        click.echo(f"time: {timing.line()}")
        click.echo(f"rates: {timing.rates.source}")
    if not result.fits:
        raise DoesNotFitError(result.verdict(), result)


def _disk(spec, resolved, result, budget, calibrate: bool):  # noqa: ANN001, ANN202
    """What the drive costs a step when the model does not fit the RAM the run may use (``--ram``
    when given, else what this machine has available): read rate cached per drive, or measured on
    the model's own file now (``--calibrate``); AUTO's host tier. None for RESIDENT."""
    from lema.adapters.host_memory import ProcMeminfo
    from lema.app.disk_plan import disk_for, drive_rate, probe_file

    s = result.shape
    available = budget.host_bytes if budget is not None and budget.host_bytes is not None \
        else ProcMeminfo().available_bytes()
    probe = probe_file(spec, resolved.weights_path, resolved.root)
    rate = None
    if calibrate and probe is not None:
        rate = drive_rate(probe, measure=True, refresh=True)
        if rate is not None:
            click.echo(f"calibrated: drive {rate[0] / 2**30:.2f} GiB/s sustained reading {probe} ({rate[1]})",
                       err=True)
    return disk_for(spec, result, s.strategy, in_place=bool(s.weights_in_place),
                    host_memory_device=s.device.host_memory, available=available,
                    rate=lambda: rate or drive_rate(probe, measure=False) or (
                        0.0, "no local model file" if probe is None else "not cached; --calibrate measures it"))


def _rates(spec, shape, calibrate: bool):  # noqa: ANN001, ANN202
    """This machine's rates for the step time: measured now (``--calibrate``), cached, or None
    (the planner then uses the device kind's stated defaults)."""
    from lema.adapters.devices.calibration_cache import device_name, rates_for
    from lema.domain.plan.assemble import facts_for

    if not calibrate:
        return rates_for(spec, shape)
    from lema.adapters.devices.calibrate import calibrate as measure
    traits = shape.device
    name = device_name(traits)
    if not name:
        raise ConfigError(f"--calibrate measures a local {traits.kind} device, but there is none here; "
                          "calibrate on the machine that will train, or plan with --device cpu")
    if traits.host_memory:
        from lema.adapters.devices.cpu import CpuDevice

        device = CpuDevice()
    else:
        from lema.adapters.devices.cuda import CudaDevice

        device = CudaDevice()
    try:
        from lema.app.tools.engine_overhead import engine_overhead

        rates, path = measure(device, name, facts_for(spec, shape), shape.dtype or spec.dtype, shape.batch,
                              shape.seq, chunk=shape.head_chunk_tokens, spec=spec, shape=shape,
                              engine=engine_overhead)
    finally:
        device.close()
    r = rates
    click.echo(f"calibrated: link {r.link_bytes_per_s / 1e9:.2f} GB/s pinned, "
               f"{r.link_pageable_bytes_per_s / 1e9:.2f} GB/s pageable; matmul "
               f"{r.matmul_flops_per_s / 1e12:.3g} TFLOP/s, attention {r.attention_flops_per_s / 1e12:.3g} "
               f"TFLOP/s, memory {r.memory_bytes_per_s / 1e9:.3g} GB/s; fixed costs: layer forward "
               f"{r.layer_forward_overhead_s * 1e3:.3g} ms, backward {r.layer_backward_overhead_s * 1e3:.3g} ms, "
               f"head chunk {r.head_overhead_s * 1e3:.3g} ms, {r.tensor_overhead_s * 1e6:.3g} us per trainable "
               f"tensor, {r.unit_overhead_s * 1e3:.3g} ms per engine step, {r.step_overhead_s * 1e3:.3g} ms per "
               f"step (cached in {path})", err=True)
    return rates


def _device(asked: str) -> tuple[str, str]:
    """The device kind planned for and how it was chosen (``--device auto``: is a GPU visible?)."""
    if asked != "auto":
        return asked, f"{asked} (--device {asked})"
    from lema.adapters.devices.probe import local_gpu_memory

    gpu = local_gpu_memory()
    if gpu is not None:
        return "cuda", f"cuda ({gpu[1]} visible; --device auto)"
    return "cpu", "cpu (no GPU visible; --device auto; --device cuda plans for a GPU)"


def _reserve(text: str) -> int:
    from lema.domain.units import parse_size

    return 0 if text.strip() in ("0", "0B", "0G", "0M") else parse_size(text, field="--reserve")


def _print_human(ref: str, resolved, result, link: int, floor: float, budget_source: str,  # noqa: ANN001
                 device_note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from lema.domain.plan.memory_plan import link_line, run_extras
    from lema.domain.units import format_size

    console = Console(highlight=False, soft_wrap=True)
    console.width = max(console.width, 110)  # room for the notes column when piped
    m, s = result.model, result.shape
    console.print(f"[bold]{ref}[/]: {m.model_type} ({m.family}), {m.n_layers} layers, hidden {m.hidden_size}, "
                  f"{m.parameters:,} parameters, {format_size(m.weight_bytes)} "
                  f"{m.quantization + ', computing in ' + m.dtype if m.quantization else m.dtype} "
                  f"(largest layer {format_size(m.largest_layer_bytes)}, head {format_size(m.head_bytes)})")
    console.print(f"run: {s.mode}, batch {s.batch}, seq {s.seq}, LoRA rank {s.lora_rank} on "
                  f"{','.join(m.lora_targets)}; {s.strategy.value}, prefetch {s.prefetch}, checkpointing "
                  f"{'on' if s.gradient_checkpointing else 'off'}, {s.attention_path} attention, {s.device_kind}"
                  + run_extras(result))
    console.print(f"device: {device_note}")
    if resolved.note:
        console.print(f"note: {resolved.note}")
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("where")
    table.add_column("component")
    table.add_column("size", justify="right")
    table.add_column("how")
    ranks = s.local_ranks
    if ranks > 1:
        console.print(f"data parallel: {ranks} ranks on this machine, each on its own device with batch {s.batch} "
                      f"(global batch {ranks * s.batch}); device memory is per rank, host memory for all {ranks}")
    device_label, host_label = ("device/rank", f"host ({ranks} ranks)") if ranks > 1 else ("device", "host")
    for where, items, total in ((device_label, result.device_items, result.device_total),
                                (host_label, result.host_items, result.host_total)):
        for item in items:
            table.add_row(where, item.name, format_size(item.bytes), item.note)
        table.add_row(where, "[bold]total[/]", f"[bold]{format_size(total)}[/]", "", end_section=True)
    console.print(table)
    console.print(f"link: {link_line(result)}; at {format_size(link)}/s (assumed, one copy stream) at least "
                  f"{floor:.2f} s per step")
    for choice in result.choices:
        console.print(f"chose: {choice}")
    if result.budget is None:
        console.print(("no --vram given: " if s.device_kind != "cuda" else "no --vram given and no GPU visible: ")
                      + result.verdict())
    elif result.fits:
        where = "" if budget_source == "--vram" else f" (budget: {budget_source})"
        console.print(f"[bold green]{result.verdict()}[/]{where}")
    if result.recommendations:
        console.print("recommendations:")
    for rec in result.recommendations:
        console.print(f"  - {rec}")


def _list_models(as_json: bool) -> None:
    from lema.adapters.weights.builtin_models import builtin_config, builtin_names
    from lema.domain.model.spec import ModelSpec
    from lema.domain.units import format_size

    rows = []
    for name in builtin_names():
        spec = ModelSpec.from_config(builtin_config(name))
        rows.append({"name": name, "family": spec.family, "model_type": spec.model_type, "n_layers": spec.n_layers,
                     "parameters": spec.parameters, "dtype": spec.dtype, "weight_bytes": spec.weight_bytes})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for col, justify in (("name", "left"), ("type", "left"), ("layers", "right"), ("parameters", "right"),
                         ("dtype", "left"), ("weights", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r["name"], r["model_type"], str(r["n_layers"]), f"{r['parameters'] / 1e9:.2f} B", r["dtype"],
                      format_size(r["weight_bytes"]))
    Console(highlight=False).print(table)
