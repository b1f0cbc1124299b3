"""``lema train --model PATH --data DATA --out DIR``: fine-tune a LoRA adapter from the shell.

This module parses the options (:mod:`lema.cli.train_options`, or a ``--config`` YAML file)
and prints; the data is prepared by :mod:`lema.app.run_data` (read, tokenized, cached,
packed: :mod:`lema.data`) and the steps run in :func:`lema.app.train_loop.train_loop`.

What the run leaves in ``DIR``:

* ``checkpoint-<step>/`` every ``--save-steps`` optimizer steps, and when Ctrl-C stops the
  run (peft adapter + optimizer/trainer state + tokenizer: resumable);
* ``final/``: the same, written when the run completes (the adapter to use);
* ``metrics.jsonl``: one JSON object per optimizer step (step, loss, lr, tokens_per_s,
  device_peak_bytes, ...) and one per evaluation (step, eval_loss, eval_perplexity);
* ``tensorboard/`` (``--report-to tensorboard``) and ``wandb/`` (``--report-to wandb``);
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
from lema.app.run_inputs import open_tokenizer, resolve_model_arg, save_tokenizer_with_template
from lema.app.train_loop import (
    DATA_ARGS,
    LoopOptions,
    make_optimizer,
    plan_summary,
    require_bitsandbytes,
    train_loop,
)
from lema.cli.context_check import check_seq
from lema.cli.progress import TrainingProgress
from lema.cli.train_options import train_options
from lema.config import check_seed
from lema.domain.json_values import parse_json
from lema.domain.units import parse_size
from lema.errors import ConfigError, LemaWarning

EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

# -- the command -----------------------------------------------------------------------------


@click.command("train")
@train_options
@click.pass_context
def train(ctx: click.Context, **options: Any) -> None:
    """Fine-tune a LoRA adapter on --data and write it to --out.

    OUT gets checkpoint-<step>/ every --save-steps and on Ctrl-C or SIGTERM, final/ when
    the run completes (peft adapter + optimizer state + tokenizer), and metrics.jsonl.
    OUT must be new or empty; --resume continues the run in it exactly where it stopped.
    Every option can also be a key of --config run.yaml; flags override it.

    \b
    Example:
      lema train --model llama2_7b.safetensors --data chat.jsonl --out runs/a \\
                 --steps 1000 --batch 4 --seq 1024 --packing --eval-split 0.05 --eval-steps 100
    """
    from lema.app import bootstrap, distributed
    from lema.app.ranked_run import open_ranked_run

    o = TrainOptions(**options)
    ranks, device = distributed.start(o.device)  # torchrun: join the process group, pick this rank's device
    o = attrs.evolve(o, device=device, nproc=ranks.world)
    if o.steps is not None and o.epochs is not None:
        raise ConfigError("pass --steps or --epochs, not both")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"--lr: {o.lr!r} must be a positive number")
    for flag, value in (("--weight-decay", o.weight_decay), ("--max-grad-norm", o.max_grad_norm),
                        ("--alpha", o.alpha), ("--lora-dropout", o.lora_dropout), ("--eval-split", o.eval_split)):
        if value is not None and not math.isfinite(value):  # click's FloatRange lets nan through
            raise ConfigError(f"{flag}: {value!r} is not a finite number")
    if o.reset_optimizer and not o.resume:
        raise ConfigError("--reset-optimizer only applies with --resume")
    if o.eval_data is not None and o.eval_split is not None:
        raise ConfigError("pass --eval-data or --eval-split, not both")
    check_seed(o.seed, "--seed")
    o.max_line_bytes()  # checked before anything is opened
    if o.vram is not None:
        parse_size(o.vram, field="--vram")  # named as the user wrote it, not as LemaConfig's vram_budget
    bootstrap.sink_names(o.report_to)  # an unknown sink or a missing library: said before any work
    if o.optimizer == "adamw8bit":
        require_bitsandbytes()
    out_dir = Path(o.out)
    model_arg = Path(o.model_path).expanduser()
    check_output(out_dir, option="--out", overwrite=None, folders=[model_arg if model_arg.is_dir() else None],
                 files=[model_arg if model_arg.is_file() else None, Path(o.data),
                        None if o.eval_data is None else Path(o.eval_data)])
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
    """The command's options, as click passes them (:mod:`lema.cli.train_options`)."""

    model_path: str
    data: str
    out: str
    data_format: str
    chat_template: str | None
    packing: bool
    eval_data: str | None
    eval_split: float | None
    eval_steps: int
    steps: int | None
    epochs: int | None
    batch: int
    seq: int
    lr: float
    optimizer: str
    weight_decay: float
    max_grad_norm: float
    rank: int
    alpha: float | None
    lora_dropout: float
    targets: str | None
    dtype: str
    strategy: str
    vram: str | None
    grad_accum: int
    save_steps: int
    save_total_limit: int
    report_to: str
    run_name: str | None
    resume: bool
    reset_optimizer: bool
    seed: int
    tokenizer: str | None
    device: str
    offload: bool | None
    prefetch: int
    warmup: int
    lr_schedule: str
    max_line_size: str
    data_cache: bool
    nproc: int = 1  # torchrun's ranks (not an option: the launcher sets it)

    @property
    def format(self) -> str | None:
        return None if self.data_format == "auto" else self.data_format

    def max_line_bytes(self) -> int:
        """``--max-line-size`` in bytes (ConfigError naming the option when it is not a size)."""
        return parse_size(self.max_line_size, field="--max-line-size")

    def args(self) -> dict[str, Any]:
        """What ``train_args.json`` records (compared on ``--resume``)."""
        return {"model": self.model_path, "data": str(self.data), "batch": self.batch, "seq": self.seq,
                "grad_accum": self.grad_accum, "seed": self.seed, "rank": self.rank, "alpha": self.alpha,
                "targets": self.targets, "lr": self.lr, "steps": self.steps, "epochs": self.epochs,
                "warmup": self.warmup, "lr_schedule": self.lr_schedule, "lora_dropout": self.lora_dropout,
                "global_batch": self.batch * self.nproc, "nproc": self.nproc, "format": self.format,
                "chat_template": self.chat_template, "packing": self.packing, "eval_split": self.eval_split,
                "eval_data": self.eval_data, "optimizer": self.optimizer, "weight_decay": self.weight_decay,
                "max_grad_norm": self.max_grad_norm, "dtype": self.dtype}


def _train(o: TrainOptions, out_dir: Path, ckpt: Path | None, ranks: Any) -> int:
    """The run itself, in a locked ``out_dir``; returns the exit status."""
    from lema.app import bootstrap
    from lema.app.model import LemaModel
    from lema.app.run_data import check_vocab, prepare_data
    from lema.config import LemaConfig
    from lema.data.examples import batches_per_epoch

    gbi_path, name_or_path = resolve_model_arg(o.model_path, echo=click.echo)
    # The context comes from the header and config alone: a --seq beyond it is refused
    # before the data is read.
    check_seq(o.seq, bootstrap.open_model(LemaConfig(gbi_path=gbi_path, model_name_or_path=name_or_path)).spec,
              lambda line: click.echo(line, err=True))
    tok, tok_dir = open_tokenizer(o.tokenizer, o.model_path)
    data = prepare_data(o.data, tok, seq=o.seq, format=o.format, chat_template=o.chat_template, packing=o.packing,
                        eval_data=o.eval_data, eval_split=o.eval_split, seed=o.seed, cache=o.data_cache,
                        max_line_bytes=o.max_line_bytes(), progress=click.echo)
    per_epoch = batches_per_epoch(len(data.items), o.batch * ranks.world)
    total = o.steps if o.steps is not None else max(1, math.ceil((o.epochs or 1) * per_epoch / o.grad_accum))
    for line in data.lines:
        click.echo(line)
    click.echo(f"      {per_epoch} batches per epoch; {total} optimizer steps")

    runtime = dict(gbi_path=gbi_path, model_name_or_path=name_or_path, strategy=o.strategy, device=o.device,
                   vram_budget=o.vram, prefetch_distance=o.prefetch, batch_size=o.batch, max_seq_len=o.seq,
                   offload_activations="auto" if o.offload is None else o.offload,
                   gradient_accumulation_steps=o.grad_accum, dtype=o.dtype, max_grad_norm=o.max_grad_norm)
    if ckpt is not None:
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
        check_vocab(data.store, model.spec.vocab_size, o.data)
        opts = LoopOptions(out=out_dir, steps=total, batch=o.batch, seq=o.seq, lr=o.lr, seed=o.seed,
                           grad_accum=o.grad_accum, save_steps=o.save_steps, warmup=o.warmup,
                           lr_schedule=o.lr_schedule, optimizer=o.optimizer, weight_decay=o.weight_decay,
                           eval_steps=o.eval_steps, save_total_limit=o.save_total_limit)
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
        if o.chat_template is not None and ranks.is_main:  # checkpoints carry the template the run trained with
            tok_dir = save_tokenizer_with_template(tok, o.chat_template, out_dir / "tokenizer")
        if trainer.global_step >= total:
            click.echo(f"already trained {trainer.global_step} steps (asked for {total}); nothing to do")
            return 0
        sinks = bootstrap.make_sinks(o.report_to, out_dir, run_name=o.run_name, options=o.args()) \
            if ranks.is_main else []
        result = train_loop(model, trainer, data.items, tok.pad_token_id, opts, tok_dir, echo=click.echo,
                            progress=TrainingProgress if ranks.is_main else None, collate_fn=data.collate_fn,
                            eval_examples=data.eval_examples, sinks=sinks, hold_signals=True)
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
    for key, default in (("format", None), ("chat_template", None), ("packing", False), ("eval_split", None)):
        before.setdefault(key, default)  # written before chat data
    names = {"global_batch": "batch x ranks"}
    changed = [f"{names.get(k, '--' + k.replace('_', '-'))} {before.get(k)!r} -> {args[k]!r}" for k in DATA_ARGS
               if before.get(k) != args[k]]
    if changed:
        click.echo("warning: resuming with different data options than the original run ("
                   + ", ".join(changed) + "); the batches will not continue where they stopped")
