"""``lema convert MODEL OUT``: one monolithic .safetensors file from a folder or Hub id."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


@contextlib.contextmanager
def tensor_progress(verb: str) -> Iterator[Callable[[int, int, str], None]]:
    """A ``progress(done, total, name)`` callback drawing a bar on a terminal's stderr.

    The bar starts at the first callback, so errors raised before any tensor is written
    (bad paths, unknown models) print as one clean ``Error: ...`` line.
    """
    console = Console(stderr=True)
    bar: Progress | None = None
    task = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar, task
        if not console.is_terminal:
            return
        if bar is None:
            bar = Progress(TextColumn(f"[bold]{verb}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("{task.description}"), console=console, transient=True)
            bar.start()
            task = bar.add_task("", total=total)
        bar.update(task, completed=done, total=total, description=name)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.stop()


@click.command("convert")
@click.argument("model")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Convert floating tensors to this dtype (default: keep).")
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.option("--token", default=None, help="Hugging Face token for gated or private repos.")
@click.option("--device", default="auto", show_default=True,
              help="Where dtype conversion (and quantization) runs: auto, cpu or cuda.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUT.")
@click.option("--quantize", type=click.Choice(["nf4", "fp4", "int8"]), default=None,
              help="Store the linear weights quantized as transformers + bitsandbytes do (needs lema[quant]).")
@click.option("--no-double-quant", is_flag=True, help="With --quantize nf4/fp4: do not quantize the block scales.")
def convert(model: str, out: str, dtype: str | None, revision: str | None, token: str | None, device: str,
            overwrite: bool, quantize: str | None, no_double_quant: bool) -> None:
    """Convert MODEL (local folder or Hub id) into the single file OUT that LEMA streams.

    OUT must lie outside MODEL's folder; an existing OUT is replaced only with --overwrite.
    """
    from lema.app.tools.convert import prepare_monolithic_safetensors
    from lema.errors import ConfigError

    if no_double_quant and quantize not in ("nf4", "fp4"):
        raise ConfigError("--no-double-quant needs --quantize nf4 or fp4")
    with tensor_progress("quantizing" if quantize else "converting") as progress:
        path = prepare_monolithic_safetensors(model, out, device=device, dtype=dtype, revision=revision,
                                              token=token, progress=progress, overwrite=overwrite,
                                              quantize=quantize, double_quant=not no_double_quant)
    from lema.data.tokenizer import sidecar_dir

    tokenizer = sidecar_dir(path)
    if tokenizer.is_dir():
        click.echo(f"wrote {path} and its tokenizer folder {tokenizer} (keep them together: train, generate and "
                   "merge read the tokenizer from there)")
    else:
        click.echo(f"wrote {path} (the model had no tokenizer files: pass --tokenizer to train and generate)")
