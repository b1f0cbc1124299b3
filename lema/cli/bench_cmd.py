"""``lema bench``: LEMA STREAMING / RESIDENT vs transformers + peft, side by side, against the floor.

The floor of a step is ``max(link floor, compute alone)``; the bench prints each run's
``step / floor`` and the measured link (pinned and pageable), so a run that adds its
transfers to its compute instead of overlapping them shows.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--model", "model", type=click.Path(path_type=Path), default=None,
              help="A Hugging Face model folder to benchmark (default: build a random one).")
@click.option("--preset", type=click.Choice(["100m", "30m", "tiny"]), default="100m", show_default=True,
              help="Size of the model built when --model is not given.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seq", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, help="Timed steps per run.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--prefetch", type=click.IntRange(min=0), default=None,
              help="Layers read ahead in the LEMA runs (default: AUTO chooses by predicted step time, others 2).")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda or cuda:N (auto: cuda when a GPU is available, else cpu; said in the first line).")
@click.option("--strategies", default="streaming,resident", show_default=True,
              help="Comma-separated LEMA strategies; the first is the one the ratios compare.")
@click.option("--no-reference", is_flag=True, help="Skip transformers + peft (needs the peft package).")
@click.option("--link-bandwidth", metavar="RATE",
              help="CPU device only: simulate a host -> device link of RATE bytes per second (e.g. 2G), so "
                   "the overlap of reads, uploads and compute is measurable without a GPU.")
@click.option("--reads", metavar="SIZE", default="1G", show_default=True,
              help="Also time LEMA's weight reader against a sequential read of a page-cached file of SIZE "
                   "(0 to skip).")
@click.option("--schedule", type=click.Choice(["auto", "round-robin", "sequential"]), default="auto",
              show_default=True,
              help="round-robin builds every run first and steps them in turn (a load change hits all alike); "
                   "sequential runs one at a time (what a GPU's memory allows). auto: sequential on CUDA.")
@click.option("--trace", is_flag=True,
              help="Count every allocation and keep the event timeline in the timed steps (slower; the "
                   "timeline goes into the JSON result).")
@click.option("--vram", metavar="SIZE", default=None,
              help="A device budget for the LEMA runs (e.g. 64M): units go through slots under it and AUTO keeps "
                   "resident what fits (the CPU device counts its memory as a GPU's).")
@click.option("--no-predict", is_flag=True,
              help="Skip the calibration and the predicted step time printed beside each measured one.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("lema-bench"), show_default=True,
              help="Where the built model and the JSON result go.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None,
              help="Result file (default: WORKDIR/bench.json).")
@click.option("--overwrite", is_flag=True, help="Replace an existing result file.")
def bench(model, preset, dtype, batch, seq, steps, warmup, rank, prefetch, device, strategies, no_reference,
          link_bandwidth, reads, schedule, trace, vram, no_predict, workdir, json_out, overwrite) -> None:
    """Measure step time, device peak vs plan and bytes moved vs the link, in one run.

    WORKDIR keeps the models it builds (reused by the next run); the result file is
    replaced only with --overwrite.
    """
    from lema.app.tools import benchmarking
    from lema.app.outputs import check_output
    from lema.domain.plan.strategy import MemoryStrategy
    from lema.domain.units import parse_size
    from lema.errors import ConfigError

    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir: {workdir} is a file; pass a folder")
    out = json_out or workdir / "bench.json"
    inputs = [model] if model is not None else []
    check_output(workdir, option="--workdir", folders=inputs, overwrite=None)
    check_output(out, option="--json-out", folders=inputs, overwrite=overwrite)
    names = tuple(s.strip() for s in strategies.split(",") if s.strip())
    if not names:
        raise ConfigError("--strategies: name at least one of streaming, resident, auto")
    for name in names:
        MemoryStrategy.parse(name)
    device = _resolve_device(device, link_bandwidth is not None)
    if link_bandwidth is not None and device != "cpu":
        raise ConfigError("--link-bandwidth: only the CPU device simulates a link; a GPU's is measured")
    rate = parse_size(link_bandwidth, field="--link-bandwidth") if link_bandwidth is not None else None
    if vram is not None:
        if device != "cpu":
            raise ConfigError("--vram: the bench budgets the CPU device only; a GPU's budget is its memory")
        parse_size(vram, field="--vram")
    read_bytes = 0 if reads.strip() in ("0", "0B") else parse_size(reads, field="--reads")
    _check_device(device)
    if model is not None and not model.is_dir():
        raise ConfigError(f"--model: {model} is not a folder; pass a Hugging Face model folder (config.json + "
                          "weights), or leave it out to build --preset")
    reference = not no_reference
    if reference:
        try:
            import peft  # noqa: F401  (only checks that it is installed)
        except ImportError:
            raise ConfigError("transformers + peft reference needs the peft package: "
                              "pip install peft, or pass --no-reference") from None
    settings = benchmarking.BenchSettings(
        workdir=workdir, model=model, preset=preset, dtype=dtype, batch=batch, seq=seq, steps=steps,
        warmup=warmup, rank=rank, device=device, strategies=names, reference=reference, prefetch=prefetch,
        link_bandwidth=float(rate) if rate else None, trace=trace, read_bytes=read_bytes,
        vram=vram, predict=not no_predict,
        schedule=("sequential" if device.startswith("cuda") else "round-robin") if schedule == "auto" else schedule)
    result = benchmarking.run(settings, log=lambda line: click.echo(line, err=True))
    for line in benchmarking.summary_lines(result):
        click.echo(line)
    benchmarking.dump(result, out)
    click.echo(f"wrote {out}")


def _resolve_device(device: str, link: bool) -> str:
    """``--device auto``: cuda when CUDA is available (the CPU with --link-bandwidth), else cpu; said."""
    if device != "auto":
        return device
    import torch

    chosen = "cuda" if torch.cuda.is_available() and not link else "cpu"
    why = ("--link-bandwidth simulates a link on the CPU" if link and torch.cuda.is_available()
           else "a GPU is available" if chosen == "cuda" else "no GPU available")
    click.echo(f"device: {chosen} (--device auto: {why})")
    return chosen


def _check_device(device: str) -> None:
    import re

    import torch

    from lema.errors import ConfigError

    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise ConfigError(f"--device: {device!r} must be cpu, cuda or cuda:N")
    if device.startswith("cuda") and (not torch.cuda.is_available()
                                      or int(match.group(1) or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device: {device} but CUDA is not available here ({torch.cuda.device_count()} GPUs "
                          "visible); use --device cpu")
