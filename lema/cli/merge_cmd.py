"""``lema merge``: fold a LoRA adapter into the base weights."""

from __future__ import annotations

import click

from lema.cli.convert_cmd import tensor_progress


@click.command("merge")
@click.option("--base", required=True, help="LEMA .safetensors file or transformers model folder.")
@click.option("--adapter", "adapter", required=True, help="Checkpoint / PEFT adapter directory.")
@click.option("--out", required=True, help="Output .safetensors file (or folder with --hf-folder); never the base "
                                           "or the adapter, nor inside them.")
@click.option("--hf-folder", is_flag=True,
              help="Write a transformers folder (model.safetensors + config.json + tokenizer).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Output dtype of floating tensors (default: the base's).")
@click.option("--tokenizer", "tokenizer_dir", default=None,
              help="Folder whose tokenizer files to copy (default: the adapter's, else the base's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
def merge(base: str, adapter: str, out: str, hf_folder: bool, dtype: str | None, tokenizer_dir: str | None,
          overwrite: bool) -> None:
    """Merge the LoRA adapter in --adapter into --base and write --out."""
    from lema.app.tools.merge import merge_adapter

    with tensor_progress("merging") as progress:
        path = merge_adapter(base, adapter, out, dtype=dtype, hf_folder=hf_folder, tokenizer_dir=tokenizer_dir,
                             progress=progress, overwrite=overwrite)
    click.echo(f"wrote {path}")
