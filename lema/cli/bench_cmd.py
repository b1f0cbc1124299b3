"""``lema bench``: LEMA STREAMING / RESIDENT / AUTO vs transformers + peft, side by side."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--model", "model", type=click.Path(path_type=Path), default=None,
              help="A Hugging Face model folder to benchmark (default: build a random one).")
@click.option("--preset", type=click.Choice(["100m", "tiny"]), default="100m", show_default=True,
              help="Size of the model built when --model is not given.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seq", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, help="Timed steps per run.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--prefetch", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--strategies", default="streaming,resident", show_default=True,
              help="Comma-separated LEMA strategies; the first is the one the ratios compare.")
@click.option("--no-reference", is_flag=True, help="Skip transformers + peft (needs the peft package).")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("lema-bench"), show_default=True,
              help="Where the built model and the JSON result go.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None,
              help="Result file (default: WORKDIR/bench.json).")
def bench(model, preset, dtype, batch, seq, steps, warmup, rank, prefetch, device, strategies, no_reference,
          workdir, json_out) -> None:
    """Measure step time, device peak vs plan and bytes moved vs the link, in one run."""
    from lema.app import benchmarking
    from lema.domain.plan.strategy import MemoryStrategy
    from lema.errors import ConfigError

    names = tuple(s.strip() for s in strategies.split(",") if s.strip())
    for name in names:
        MemoryStrategy.parse(name)
    reference = not no_reference
    if reference:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("transformers + peft reference needs the peft package: "
                              "pip install peft, or pass --no-reference") from None
    settings = benchmarking.BenchSettings(
        workdir=workdir, model=model, preset=preset, dtype=dtype, batch=batch, seq=seq, steps=steps,
        warmup=warmup, rank=rank, device=device, strategies=names, reference=reference, prefetch=prefetch)
    result = benchmarking.run(settings, log=lambda line: click.echo(line, err=True))
    for line in benchmarking.summary_lines(result):
        click.echo(line)
    out = json_out or workdir / "bench.json"
    benchmarking.dump(result, out)
    click.echo(f"wrote {out}")
