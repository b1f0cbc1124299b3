"""``lema train --model PATH --data FILE --out DIR``: fine-tune a LoRA adapter from the shell.

What the run leaves in ``DIR``:

* ``checkpoint-<step>/`` every ``--save-steps`` optimizer steps, and when Ctrl-C stops the
  run (peft adapter + optimizer/trainer state + tokenizer: resumable);
* ``final/``: the same, written when the run completes (the adapter to use);
* ``metrics.jsonl``: one JSON object per optimizer step (step, loss, lr, tokens_per_s,
  device_peak_bytes, ...);
* ``train_args.json``: the options of the run, compared on ``--resume``.

``--resume`` continues from the checkpoint in ``DIR`` with the highest step (``final`` or a
``checkpoint-<step>``): adapter, optimizer, LR schedule and RNG states are restored and the
batches already consumed are skipped, so a resumed run ends with the same adapter as a
straight one (bit for bit on CPU).

Exit status: 0 done, 1 the plan does not fit (the message says what would), 2 bad input,
130 stopped by Ctrl-C (after saving a checkpoint).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from lema.app.run_inputs import open_tokenizer, resolve_model_arg
from lema.app.train_loop import (
    ARGS,
    DATA_ARGS,
    LoopOptions,
    latest_checkpoint,
    make_optimizer,
    plan_summary,
    train_loop,
)
from lema.cli.progress import TrainingProgress
from lema.errors import CheckpointError, ConfigError, DataError

# -- the command -----------------------------------------------------------------------------


@click.command("train")
@click.option("--model", "model_path", required=True, metavar="PATH",
              help="A converted .safetensors file, or a Hugging Face model folder (.bin weights are converted "
                   "once into $LEMA_CACHE, default ~/.cache/lema).")
@click.option("--data", required=True, metavar="FILE",
              help="Training data: .txt (cut into --seq blocks), .jsonl with \"text\", or .jsonl with "
                   "\"prompt\"/\"completion\" (loss on the completion).")
@click.option("--out", required=True, metavar="DIR", help="Where checkpoints and metrics.jsonl go.")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps to train (total, counting resumed ones).")
@click.option("--epochs", type=click.IntRange(min=1), help="Passes over the data (default 1 when --steps is not given).")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Sequences per micro-batch.")
@click.option("--seq", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per sequence.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank).")
@click.option("--targets", metavar="A,B,...", help="LoRA target modules, comma-separated (default: the family's; "
                                                   "'all-linear').")
@click.option("--strategy", type=click.Choice(["streaming", "resident", "auto"]), default="streaming",
              show_default=True, help="How base weights reach the device.")
@click.option("--vram", metavar="SIZE", help="Device memory budget, e.g. 8G (default: the device's capacity).")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--save-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Write DIR/checkpoint-<step> every N optimizer steps (0: only at the end).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in DIR.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the adapter init and data order.")
@click.option("--tokenizer", metavar="PATH", help="Tokenizer folder (default: the model's folder).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--prefetch", type=click.IntRange(min=0), default=2, show_default=True,
              help="Layers read ahead of the one computing.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Linear warmup steps.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine", "linear"]), default="constant",
              show_default=True)
@click.pass_context
def train(ctx: click.Context, model_path: str, data: str, out: str, steps: int | None, epochs: int | None,
          batch: int, seq: int, lr: float, rank: int, alpha: float | None, targets: str | None, strategy: str,
          vram: str | None, grad_accum: int, save_steps: int, resume: bool, seed: int, tokenizer: str | None,
          device: str, prefetch: int, warmup: int, lr_schedule: str) -> None:
    """Fine-tune a LoRA adapter on --data and write it to --out.

    OUT gets checkpoint-<step>/ every --save-steps and on Ctrl-C, final/ when the run
    completes (peft adapter + optimizer state + tokenizer), and metrics.jsonl. --resume
    continues from the latest of them exactly where it stopped.

    \b
    Example:
      lema train --model llama2_7b.safetensors --data train.jsonl --out runs/a \\
                 --steps 1000 --batch 4 --seq 512 --lr 2e-4 --save-steps 200
    """
    from lema.app.model import LemaModel
    from lema.config import LemaConfig
    from lema.data.examples import batches_per_epoch, read_examples

    if steps is not None and epochs is not None:
        raise ConfigError("pass --steps or --epochs, not both")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"--lr: {lr!r} must be a positive number")
    out_dir = Path(out)
    args = {"model": model_path, "data": str(data), "batch": batch, "seq": seq, "grad_accum": grad_accum,
            "seed": seed, "rank": rank, "alpha": alpha, "targets": targets, "lr": lr, "steps": steps,
            "epochs": epochs, "warmup": warmup, "lr_schedule": lr_schedule}
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {out_dir} (looked for final/ and checkpoint-<step>/); "
                                  "run without --resume to start fresh")
        _check_resume_args(out_dir, args)
    elif out_dir.is_dir() and latest_checkpoint(out_dir) is not None:
        raise ConfigError(f"--out: {out_dir} already holds checkpoints; pass --resume to continue that run, "
                          "or choose another --out")

    gbi_path, name_or_path = resolve_model_arg(model_path, echo=click.echo)
    tok, tok_dir = open_tokenizer(tokenizer, model_path)
    dataset = read_examples(data, tok, seq)
    per_epoch = batches_per_epoch(len(dataset.examples), batch)
    total = steps if steps is not None else max(1, math.ceil((epochs or 1) * per_epoch / grad_accum))
    click.echo(f"data: {data}: {dataset.format}, {len(dataset.examples):,} examples, {dataset.n_tokens:,} tokens"
               + (f" ({dataset.n_truncated} truncated to --seq {seq})" if dataset.n_truncated else "")
               + f"; {per_epoch} batches per epoch; {total} optimizer steps")

    runtime = dict(gbi_path=gbi_path, model_name_or_path=name_or_path, strategy=strategy, device=device,
                   vram_budget=vram, prefetch_distance=prefetch, batch_size=batch, max_seq_len=seq,
                   gradient_accumulation_steps=grad_accum)
    if ckpt is not None:
        from lema.app import bootstrap

        # from_pretrained's `device` keyword takes a Device object, so the device this run
        # asks for is built here rather than passed as a config override.
        dev = bootstrap.make_device(LemaConfig(**runtime))
        model = LemaModel.from_pretrained(ckpt, device=dev,
                                          **{k: v for k, v in runtime.items() if k != "device"})
    else:
        config = LemaConfig(lora_rank=rank, lora_alpha=alpha, seed=seed,
                            lora_target_modules=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
                            **runtime)
        model = LemaModel(config)
        model.initialize_lora()
    click.echo(plan_summary(model))
    _check_vocab(dataset, model, data)
    opts = LoopOptions(out=out_dir, steps=total, batch=batch, seq=seq, lr=lr, seed=seed, grad_accum=grad_accum,
                       save_steps=save_steps, warmup=warmup, lr_schedule=lr_schedule)
    optimizer, scheduler = make_optimizer(model, opts)
    trainer = model.get_trainer(optimizer, scheduler=scheduler)
    if ckpt is not None:
        click.echo(f"resuming from {ckpt} at step {trainer.global_step}")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ARGS).write_text(json.dumps(args, indent=2), encoding="utf-8")
    if trainer.global_step >= total:
        click.echo(f"already trained {trainer.global_step} steps (asked for {total}); nothing to do")
        return
    result = train_loop(model, trainer, dataset.examples, tok.pad_token_id, opts, tok_dir,
                        echo=click.echo, progress=TrainingProgress)
    if result.interrupted:
        click.echo(f"interrupted at step {result.steps_done}: saved {result.checkpoint}; continue with the same "
                   "command plus --resume")
        ctx.exit(130)
    click.echo(f"done: {result.steps_done} steps in {result.seconds:.1f} s, last loss "
               f"{result.last_loss if result.last_loss is None else format(result.last_loss, '.4f')}; "
               f"adapter in {result.checkpoint}")


def _check_resume_args(out: Path, args: dict[str, Any]) -> None:
    try:
        before = json.loads((out / ARGS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {args[k]!r}" for k in DATA_ARGS
               if before.get(k) != args[k]]
    if changed:
        click.echo("warning: resuming with different data options than the original run ("
                   + ", ".join(changed) + "); the batches will not continue where they stopped")


def _check_vocab(dataset: Any, model: Any, data: str) -> None:
    top = max(max(e.input_ids) for e in dataset.examples)
    if top >= model.spec.vocab_size:
        raise DataError(f"{data}: the tokenizer produces token id {top} but the model's vocabulary has "
                        f"{model.spec.vocab_size} entries; pass the model's own tokenizer with --tokenizer")
