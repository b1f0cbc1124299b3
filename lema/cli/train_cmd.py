"""``lema train --model PATH --data FILE --out DIR``: fine-tune a LoRA adapter from the shell.

What the run leaves in ``DIR``:

* ``checkpoint-<step>/`` every ``--save-steps`` optimizer steps, and when Ctrl-C stops the
  run (peft adapter + optimizer/trainer state + tokenizer: resumable);
* ``final/``: the same, written when the run completes (the adapter to use);
* ``metrics.jsonl``: one JSON object per optimizer step (step, loss, lr, tokens_per_s,
  device_peak_bytes, ...);
* ``train_args.json``: the options of the run, compared on ``--resume``.

``--resume`` continues from the complete checkpoint in ``DIR`` with the highest step
(``final`` or a ``checkpoint-<step>``, including the recovery copy an interrupted save
leaves): adapter, optimizer, LR schedule and RNG states (LoRA dropout's included) are
restored and the batches already consumed are skipped, so a resumed run ends with the same
adapter as a straight one (bit for bit on CPU). Without ``--resume`` ``DIR`` must be new or
empty. While it runs, ``DIR/.lema.lock`` (holding the pid) keeps a second ``lema train``
out of ``DIR``.

Under ``torchrun --nproc-per-node N lema train ...`` every rank trains on its ``--batch``
rows of each ``N x --batch`` batch on its own device (``cuda:LOCAL_RANK``, or the CPU with
gloo); rank 0 prints, locks ``DIR``, writes metrics and checkpoints (docs/distributed.md).

Exit status: 0 done, 1 the plan does not fit (the message says what would) or a
non-finite loss stopped the run (after saving the last good step), 2 bad input, 130
stopped by Ctrl-C, 143 stopped by SIGTERM (both after saving a checkpoint).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import attrs
import click

from lema.adapters.checkpoints.atomic import atomic_write_text
from lema.app.outputs import check_output
from lema.app.run_folder import ARGS
from lema.app.run_inputs import open_tokenizer, resolve_model_arg
from lema.app.train_loop import (
    DATA_ARGS,
    LoopOptions,
    make_optimizer,
    plan_summary,
    train_loop,
)
from lema.cli.progress import TrainingProgress
from lema.config import check_seed
from lema.domain.json_values import parse_json
from lema.domain.units import parse_size
from lema.errors import ConfigError, DataError, LemaWarning

EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

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
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sequences per micro-batch (per rank under torchrun).")
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
@click.option("--resume", is_flag=True, help="Continue from the latest complete checkpoint in DIR.")
@click.option("--reset-optimizer", is_flag=True,
              help="With --resume: start AdamW fresh instead of from the checkpoint's optimizer state "
                   "(required when optimizer.safetensors is missing).")
@click.option("--lora-dropout", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=0.0,
              show_default=True, help="Dropout on the adapters' input (seeded by --seed; exact on --resume).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the adapter init, LoRA dropout and data order.")
@click.option("--tokenizer", metavar="PATH", help="Tokenizer folder (default: the model's folder).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--offload-activations/--no-offload-activations", "offload", default=None,
              help="Keep the checkpointed layer inputs in host memory between each layer's forward and backward "
                   "(default: on when the memory plan needs it; the planner also tiles long sequences).")
@click.option("--prefetch", type=click.IntRange(min=0), default=2, show_default=True,
              help="Layers read ahead of the one computing.")
@click.option("--max-line-size", default="1M", show_default=True, metavar="SIZE",
              help="Longest line of --data accepted (bytes of text); longer lines are refused before tokenizing.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Linear warmup steps.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine", "linear"]), default="constant",
              show_default=True)
@click.pass_context
def train(ctx: click.Context, **options: Any) -> None:
    """Fine-tune a LoRA adapter on --data and write it to --out.

    OUT gets checkpoint-<step>/ every --save-steps and on Ctrl-C or SIGTERM, final/ when
    the run completes (peft adapter + optimizer state + tokenizer), and metrics.jsonl.
    OUT must be new or empty; --resume continues the run in it exactly where it stopped.

    \b
    Example:
      lema train --model llama2_7b.safetensors --data train.jsonl --out runs/a \\
                 --steps 1000 --batch 4 --seq 512 --lr 2e-4 --save-steps 200
    """
    from lema.app import distributed
    from lema.app.ranked_run import open_ranked_run

    o = TrainOptions(**options)
    ranks, device = distributed.start(o.device)  # torchrun: join the process group, pick this rank's device
    o = attrs.evolve(o, device=device, nproc=ranks.world)
    if o.steps is not None and o.epochs is not None:
        raise ConfigError("pass --steps or --epochs, not both")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"--lr: {o.lr!r} must be a positive number")
    if o.reset_optimizer and not o.resume:
        raise ConfigError("--reset-optimizer only applies with --resume")
    check_seed(o.seed, "--seed")
    o.max_line_bytes()  # checked before anything is opened
    out_dir = Path(o.out)
    model_arg = Path(o.model_path).expanduser()
    check_output(out_dir, option="--out", overwrite=None, folders=[model_arg if model_arg.is_dir() else None],
                 files=[model_arg if model_arg.is_file() else None, Path(o.data)])
    with open_ranked_run(out_dir, resume=o.resume, ranks=ranks, echo=click.echo) as checkpoint:
        if checkpoint is not None:
            _check_resume_args(out_dir, o.args())
        code = _train(o, out_dir, checkpoint, ranks)
    if code and ranks.distributed:  # stopped early: torchrun ends every rank once one exits non-zero,
        from lema.app.rank_agreement import farewell  # so wait until rank 0 has saved and unlocked

        farewell()
    if code:
        ctx.exit(code)


@attrs.frozen(kw_only=True)
class TrainOptions:
    """The command's options, as click passes them."""

    model_path: str
    data: str
    out: str
    steps: int | None
    epochs: int | None
    batch: int
    seq: int
    lr: float
    rank: int
    alpha: float | None
    targets: str | None
    strategy: str
    vram: str | None
    grad_accum: int
    save_steps: int
    resume: bool
    reset_optimizer: bool
    lora_dropout: float
    seed: int
    tokenizer: str | None
    device: str
    offload: bool | None
    prefetch: int
    max_line_size: str
    warmup: int
    lr_schedule: str
    nproc: int = 1  # torchrun's ranks (not an option: the launcher sets it)

    def max_line_bytes(self) -> int:
        """``--max-line-size`` in bytes (ConfigError naming the option when it is not a size)."""
        return parse_size(self.max_line_size, field="--max-line-size")

    def args(self) -> dict[str, Any]:
        """What ``train_args.json`` records (compared on ``--resume``)."""
        return {"model": self.model_path, "data": str(self.data), "batch": self.batch, "seq": self.seq,
                "grad_accum": self.grad_accum, "seed": self.seed, "rank": self.rank, "alpha": self.alpha,
                "targets": self.targets, "lr": self.lr, "steps": self.steps, "epochs": self.epochs,
                "warmup": self.warmup, "lr_schedule": self.lr_schedule, "lora_dropout": self.lora_dropout,
                "global_batch": self.batch * self.nproc, "nproc": self.nproc}


def _train(o: TrainOptions, out_dir: Path, ckpt: Path | None, ranks: Any) -> int:
    """The run itself, in a locked ``out_dir``; returns the exit status."""
    from lema.app.model import LemaModel
    from lema.config import LemaConfig
    from lema.data.examples import batches_per_epoch, read_examples

    gbi_path, name_or_path = resolve_model_arg(o.model_path, echo=click.echo)
    tok, tok_dir = open_tokenizer(o.tokenizer, o.model_path)
    dataset = read_examples(o.data, tok, o.seq, max_line_bytes=o.max_line_bytes())
    per_epoch = batches_per_epoch(len(dataset.examples), o.batch * ranks.world)
    total = o.steps if o.steps is not None else max(1, math.ceil((o.epochs or 1) * per_epoch / o.grad_accum))
    click.echo(f"data: {o.data}: {dataset.format}, {len(dataset.examples):,} examples, {dataset.n_tokens:,} tokens"
               + (f" ({dataset.n_truncated} truncated to --seq {o.seq})" if dataset.n_truncated else "")
               + f"; {per_epoch} batches per epoch; {total} optimizer steps")

    runtime = dict(gbi_path=gbi_path, model_name_or_path=name_or_path, strategy=o.strategy, device=o.device,
                   vram_budget=o.vram, prefetch_distance=o.prefetch, batch_size=o.batch, max_seq_len=o.seq,
                   offload_activations="auto" if o.offload is None else o.offload,
                   gradient_accumulation_steps=o.grad_accum)
    if ckpt is not None:
        from lema.app import bootstrap

        # from_pretrained's `device` keyword takes a Device object, so the device this run
        # asks for is built here rather than passed as a config override.
        dev = bootstrap.make_device(LemaConfig(**runtime))
        model = LemaModel.from_pretrained(ckpt, device=dev,
                                          **{k: v for k, v in runtime.items() if k != "device"})
    else:
        targets = [t.strip() for t in o.targets.split(",") if t.strip()] if o.targets else None
        config = LemaConfig(lora_rank=o.rank, lora_alpha=o.alpha, lora_dropout=o.lora_dropout, seed=o.seed,
                            lora_target_modules=targets, **runtime)
        model = LemaModel(config)
        model.initialize_lora()
    with model:
        click.echo(plan_summary(model))
        _check_vocab(dataset, model, o.data)
        opts = LoopOptions(out=out_dir, steps=total, batch=o.batch, seq=o.seq, lr=o.lr, seed=o.seed,
                           grad_accum=o.grad_accum, save_steps=o.save_steps, warmup=o.warmup,
                           lr_schedule=o.lr_schedule)
        optimizer, scheduler = make_optimizer(model, opts)
        with warnings.catch_warnings():
            warnings.simplefilter("always", LemaWarning)  # every run says it (the CLI prints "warning: ...")
            trainer = model.get_trainer(optimizer, scheduler=scheduler, reset_optimizer=o.reset_optimizer)
        if ranks.distributed:  # every rank is ready (or all stop with the first one's error) before any writes
            from lema.app.rank_agreement import settle

            settle()
        if ckpt is not None:
            click.echo(f"resuming from {ckpt} at step {trainer.global_step}"
                       + (" with a fresh optimizer (--reset-optimizer)" if o.reset_optimizer else ""))
        elif ranks.is_main:
            atomic_write_text(out_dir / ARGS, json.dumps(o.args(), indent=2))
        if trainer.global_step >= total:
            click.echo(f"already trained {trainer.global_step} steps (asked for {total}); nothing to do")
            return 0
        result = train_loop(model, trainer, dataset.examples, tok.pad_token_id, opts, tok_dir,
                            echo=click.echo, progress=TrainingProgress if ranks.is_main else None)
    if result.interrupted:
        click.echo(f"interrupted at step {result.steps_done}: saved {result.checkpoint}; continue with the same "
                   "command plus --resume")
        return EXIT_SIGNAL.get(result.signal or "SIGINT", 130)
    click.echo(f"done: {result.steps_done} steps in {result.seconds:.1f} s, last loss "
               f"{result.last_loss if result.last_loss is None else format(result.last_loss, '.4f')}; "
               f"adapter in {result.checkpoint}")
    return 0


def _check_resume_args(out: Path, args: dict[str, Any]) -> None:
    try:
        before = parse_json((out / ARGS).read_bytes())
    except (OSError, ValueError):
        return
    if not isinstance(before, dict):
        return
    before.setdefault("global_batch", before.get("batch"))  # written before data parallel
    names = {"global_batch": "batch x ranks"}
    changed = [f"{names.get(k, '--' + k.replace('_', '-'))} {before.get(k)!r} -> {args[k]!r}" for k in DATA_ARGS
               if before.get(k) != args[k]]
    if changed:
        click.echo("warning: resuming with different data options than the original run ("
                   + ", ".join(changed) + "); the batches will not continue where they stopped")


def _check_vocab(dataset: Any, model: Any, data: str) -> None:
    top = max(max(e.input_ids) for e in dataset.examples)
    if top >= model.spec.vocab_size:
        raise DataError(f"{data}: the tokenizer produces token id {top} but the model's vocabulary has "
                        f"{model.spec.vocab_size} entries; pass the model's own tokenizer with --tokenizer")
