"""``lema demo``: the whole workflow on this machine in about two minutes, no network.

1. Train a byte-level BPE tokenizer on the corpus shipped with LEMA.
2. Build a small Llama-family model with random weights (fixed seed) and convert it into
   the one self-describing ``.safetensors`` file LEMA streams from.
3. Show the memory plan, then fine-tune a LoRA adapter with the STREAMING strategy on the
   CPU: every step reads each layer from the mmap'd file, as it would for a 70B model.
4. Save the checkpoint (peft format) and print the held-out loss and a greedy generation
   before and after.

Everything lands in ``--out`` (default ``./lema-demo``): ``base/`` (model + tokenizer),
``data/`` (train and held-out text), ``final/`` (the adapter checkpoint) and
``metrics.jsonl``. The same run from the shell is ``lema train --model OUT/base/model.safetensors
--data OUT/data/train.txt --out OUT ...`` (the demo prints the exact command).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import click

SIZES = {
    # hidden, layers, heads, kv heads, intermediate
    "tiny": (64, 2, 4, 2, 176),
    "small": (256, 4, 8, 4, 688),
}
VOCAB = 512
HELD_OUT_EVERY = 10  # every 10th paragraph of the corpus is held out for evaluation
PROMPT = "In the morning"
# The random base: transformers' usual init (std 0.02) for the layers, but unit-scale
# token embeddings, so the residual stream keeps each token's identity (instead of being
# drowned by the layers' random outputs), and a head wide enough for confident logits.
# A LoRA on such a base learns the corpus' statistics in a few dozen steps.
INIT_STD, EMBED_STD, HEAD_STD = 0.02, 1.0, 0.06


@attrs.frozen(kw_only=True)
class DemoSettings:
    """The demo's training run."""

    size: str = "small"
    steps: int = 80
    batch: int = 8
    seq: int = 128
    lr: float = 3e-3
    rank: int = 16
    seed: int = 0


def split_corpus(text: str) -> tuple[str, str]:
    """``(train, held_out)``: every ``HELD_OUT_EVERY``-th paragraph goes to held_out."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    held = [p for i, p in enumerate(paragraphs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [p for i, p in enumerate(paragraphs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return "\n\n".join(train) + "\n", "\n\n".join(held) + "\n"


def build_base_model(folder: Path, tokenizer: Any, size: str, seed: int) -> Path:
    """Write ``folder/model.safetensors`` (monolithic, config in its metadata), ``config.json``
    and the tokenizer files; returns the ``.safetensors`` path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lema.app.convert import prepare_monolithic_safetensors

    hidden, layers, heads, kv, inter = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=len(tokenizer),
                         max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=INIT_STD,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, EMBED_STD)
        model.lm_head.weight.normal_(0.0, HEAD_STD)
    folder.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its "Writing model shards" bar would interleave our lines
        try:
            model.save_pretrained(tmp)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        out = prepare_monolithic_safetensors(tmp, folder / "model.safetensors", device="cpu")
        shutil.copyfile(Path(tmp) / "config.json", folder / "config.json")
    tokenizer.save_pretrained(folder)
    return out


def held_out_loss(model: Any, examples: Any, pad_id: int, batch: int) -> float:
    """Mean next-token loss over the held-out examples (no gradients)."""
    from lema.data.examples import batches

    total, count = 0.0, 0
    for b in batches(examples, batch, pad_id, shuffle=False):
        loss_sum, n = model.loss(b["input_ids"], b["labels"], b["attention_mask"])
        total += loss_sum
        count += n
    return total / max(count, 1)


def greedy(model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (uses ``lema.app.generation.generate`` when present)."""
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    try:
        from lema.app.generation import generate
    except ImportError:
        generate = None
    if generate is not None:
        ids = generate(model, ids, max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id)
    else:
        for _ in range(new_tokens):
            nxt = int(model.forward(ids)[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)


def _one_line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


@click.command("demo")
@click.option("--out", default="lema-demo", show_default=True, metavar="DIR", help="Where everything is written.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help=f"Optimizer steps (default {DemoSettings().steps}).")
@click.option("--size", type=click.Choice(sorted(SIZES)), default="small", show_default=True,
              help="small: hidden 256, 4 layers (~3M parameters); tiny: hidden 64, 2 layers.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Run in a non-empty --out, replacing the demo's files there.")
def demo(out: str, steps: int | None, size: str, seed: int, overwrite: bool) -> None:
    """Fine-tune a LoRA adapter on a small local model, streaming layers on the CPU."""
    import torch

    from lema.adapters.checkpoints.atomic import atomic_write_text
    from lema.app.outputs import check_output

    from lema.app.model import LemaModel
    from lema.app.train_loop import (
        LoopOptions,
        make_optimizer,
        plan_summary,
        train_loop,
    )
    from lema.cli.progress import TrainingProgress
    from lema.config import LemaConfig, check_seed
    from lema.data.examples import read_examples, shipped_corpus
    from lema.data.tokenizer import build_byte_tokenizer
    from lema.errors import OutputError

    check_seed(seed, "--seed")
    settings = DemoSettings(size=size, seed=seed, **({} if steps is None else {"steps": steps}))
    began = time.perf_counter()
    root = Path(out).expanduser().absolute()  # absolute: the checkpoint records these paths
    if root.exists() and not root.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    check_output(root, option="--out", overwrite=overwrite)
    data_dir, base_dir = root / "data", root / "base"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_text, held_text = split_corpus(shipped_corpus())
    atomic_write_text(data_dir / "train.txt", train_text)
    atomic_write_text(data_dir / "heldout.txt", held_text)

    click.echo(f"1/4 tokenizer: byte-level BPE, {VOCAB} tokens, trained on the shipped corpus "
               f"({len(train_text):,} characters)")
    tokenizer = build_byte_tokenizer(train_text, vocab_size=VOCAB)
    hidden, layers = SIZES[size][:2]
    click.echo(f"2/4 base model: Llama-family, hidden {hidden}, {layers} layers, random weights (seed {seed})")
    weights = build_base_model(base_dir, tokenizer, size, seed)

    config = LemaConfig(model_name_or_path=str(base_dir), gbi_path=str(weights), strategy="streaming",
                        device="cpu", lora_rank=settings.rank, batch_size=settings.batch,
                        max_seq_len=settings.seq, seed=seed)
    model = LemaModel(config)
    try:
        model.initialize_lora()
        n_params = model.plan().model.parameters
        click.echo(f"3/4 {plan_summary(model)}\n      ({n_params:,} base parameters streamed from {weights})")
        train = read_examples(data_dir / "train.txt", tokenizer, settings.seq)
        held = read_examples(data_dir / "heldout.txt", tokenizer, settings.seq)
        pad = tokenizer.pad_token_id
        torch.manual_seed(seed)
        before_loss = held_out_loss(model, held.examples, pad, settings.batch)
        before_text = greedy(model, tokenizer, PROMPT, 24)

        click.echo(f"4/4 fine-tuning: {settings.steps} steps of {settings.batch} x {settings.seq} tokens, "
                   f"lr {settings.lr:g}, LoRA rank {settings.rank} on {', '.join(model.lora_spec.targets)}")
        opts = LoopOptions(out=root, steps=settings.steps, batch=settings.batch, seq=settings.seq, lr=settings.lr,
                           seed=seed, lr_schedule="cosine", warmup=max(1, settings.steps // 20))
        optimizer, scheduler = make_optimizer(model, opts)
        trainer = model.get_trainer(optimizer, scheduler=scheduler)
        result = train_loop(model, trainer, train.examples, pad, opts, base_dir, echo=click.echo, progress=TrainingProgress)
        if result.interrupted:
            click.echo(f"interrupted at step {result.steps_done}: saved {result.checkpoint}")
            click.get_current_context().exit(143 if result.signal == "SIGTERM" else 130)
        after_loss = held_out_loss(model, held.examples, pad, settings.batch)
        after_text = greedy(model, tokenizer, PROMPT, 24)
    finally:
        model.close()
    click.echo("")
    click.echo(f"held-out loss: before {before_loss:.3f} -> after {after_loss:.3f} "
               f"({'fell' if after_loss < before_loss else 'did not fall'} by {before_loss - after_loss:.3f})")
    click.echo(f"greedy before: {_one_line(before_text)!r}")
    click.echo(f"greedy after:  {_one_line(after_text)!r}")
    click.echo(f"adapter (peft format): {result.checkpoint}   metrics: {root / 'metrics.jsonl'}")
    click.echo(f"the same run from the shell: lema train --model {weights} --data {data_dir / 'train.txt'} "
               f"--out {root / 'run'} --steps {settings.steps} --batch {settings.batch} --seq {settings.seq} "
               f"--lr {settings.lr:g} --rank {settings.rank} --lr-schedule cosine --warmup {opts.warmup} "
               f"--device cpu --seed {seed}")
    click.echo(f"demo finished in {time.perf_counter() - began:.0f} s")
