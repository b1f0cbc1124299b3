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

import hashlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import click

from lema.errors import CheckpointError, ConfigError, DataError, ModelFormatError

METRICS = "metrics.jsonl"
ARGS = "train_args.json"
FINAL = "final"
# Options that change which batches a step sees: a resumed run must use the same values.
_DATA_ARGS = ("data", "batch", "seq", "grad_accum", "seed")


@attrs.frozen(kw_only=True)
class LoopOptions:
    """What the training loop needs besides the model, the tokenizer and the data."""

    out: Path
    steps: int
    batch: int
    seq: int
    lr: float
    seed: int = 0
    grad_accum: int = 1
    save_steps: int = 0
    warmup: int = 0
    lr_schedule: str = "constant"
    log_every: int = 0  # 0: about ten lines per run when not on a terminal
    resume_hint: str = ""


@attrs.frozen
class LoopResult:
    """How a training loop ended."""

    steps_done: int
    last_loss: float | None
    checkpoint: Path | None
    interrupted: bool
    seconds: float


# -- model, tokenizer and cache resolution -------------------------------------------------


def cache_dir() -> Path:
    """Where converted models are kept: ``$LEMA_CACHE`` or ``~/.cache/lema``."""
    return Path(os.environ.get("LEMA_CACHE") or Path.home() / ".cache" / "lema").expanduser()


def resolve_model_arg(model: str, echo: Callable[[str], None] = click.echo) -> tuple[str | None, str | None]:
    """``--model`` -> ``(gbi_path, model_name_or_path)`` for LemaConfig.

    A ``.safetensors`` file is used as is (its folder supplies config and tokenizer when
    its metadata has none); a folder of safetensors weights is read directly; a folder with
    only ``.bin`` weights is converted once into the cache (see :func:`cache_dir`).
    """
    # Absolute paths: they are stored in checkpoints, which may be loaded from anywhere.
    path = Path(model).expanduser().absolute()
    if path.is_file():
        folder = path.parent
        return str(path), (str(folder) if (folder / "config.json").is_file() else None)
    if not path.is_dir():
        raise ModelFormatError(f"--model: {model}: no such file or folder; pass a converted .safetensors file "
                               "or a Hugging Face model folder")
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return None, str(path)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins and (path / "config.json").is_file():
        return str(_converted(path, bins, echo)), str(path)
    return None, str(path)  # let the model resolution explain what is missing


def _converted(folder: Path, bins: list[Path], echo: Callable[[str], None]) -> Path:
    from lema.app.convert import prepare_monolithic_safetensors

    key = hashlib.sha256(str(folder.resolve()).encode())
    for f in [folder / "config.json", *bins, *folder.glob("pytorch_model.bin.index.json")]:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = cache_dir() / f"{key.hexdigest()[:20]}.safetensors"
    if not out.is_file():
        echo(f"converting {folder} (.bin weights) once into {out} ...")
        prepare_monolithic_safetensors(str(folder), out, device="cpu")
    return out


def open_tokenizer(tokenizer: str | None, model: str) -> tuple[Any, Path | None]:
    """The tokenizer named by ``--tokenizer``, else the one in (or beside) ``--model``.

    Returns ``(tokenizer, folder)``; the folder is copied into every checkpoint.
    """
    from lema.data.tokenizer import find_tokenizer_dir, load_tokenizer

    if tokenizer is not None:
        p = Path(tokenizer).expanduser()
        return load_tokenizer(p), (p if p.is_dir() else None)
    folder = find_tokenizer_dir(model)
    if folder is None:
        where = Path(model).expanduser()
        where = where.parent if where.is_file() else where
        raise ConfigError(f"no tokenizer found in {where} (looked for tokenizer.json, tokenizer.model, vocab.json); "
                          "pass the model's tokenizer folder with --tokenizer")
    return load_tokenizer(folder), folder


# -- schedule, checkpoints, metrics --------------------------------------------------------


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The LR multiplier after ``step`` optimizer steps: linear warmup, then constant, cosine
    (to 0) or linear (to 0) decay over the remaining steps."""
    if kind not in ("constant", "cosine", "linear"):
        raise ConfigError(f"--lr-schedule: {kind!r} must be constant, cosine or linear")

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def checkpoint_step(path: Path) -> int:
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint in ``out`` with the highest step (``final`` or ``checkpoint-<step>``)."""
    candidates = [p for p in [out / FINAL, *out.glob("checkpoint-*")] if (p / "trainer_state.json").is_file()]
    scored = [(checkpoint_step(p), p.name == FINAL, p) for p in candidates]
    scored = [s for s in scored if s[0] >= 0]
    return max(scored, key=lambda s: (s[0], s[1]))[2] if scored else None


def _trim_metrics(path: Path, keep_through: int) -> None:
    # Steps after the checkpoint we resume from are trained again: drop their old lines.
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= keep_through:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


class _StopFlag:
    """First Ctrl-C asks the loop to stop at the next optimizer step; a second one raises
    KeyboardInterrupt at once. Only installed in the main thread (where signals arrive)."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.requested = False
        self._echo = echo
        self._previous: Any = None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._echo("stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# -- the loop --------------------------------------------------------------------------------


def make_optimizer(model: Any, opts: LoopOptions) -> tuple[Any, Any]:
    """AdamW on the LoRA parameters and its warmup/decay schedule."""
    import torch

    optimizer = torch.optim.AdamW(model.get_trainable_parameters(), lr=opts.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts.lr_schedule, opts.warmup, opts.steps))
    return optimizer, scheduler


def train_loop(model: Any, trainer: Any, examples: Any, pad_id: int, opts: LoopOptions,
               tokenizer_dir: Path | None, echo: Callable[[str], None] = click.echo) -> LoopResult:
    """Run optimizer steps ``trainer.global_step + 1 .. opts.steps``: progress, metrics,
    periodic checkpoints, and a checkpoint on Ctrl-C (see the module docstring)."""
    from lema.adapters.checkpoints.store import rng_state, set_rng_state
    from lema.data.examples import batches

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    start = trainer.global_step
    if trainer.micro_step:
        raise CheckpointError("the checkpoint was saved in the middle of a gradient accumulation; "
                              "resume from an earlier checkpoint")
    _trim_metrics(out / METRICS, start)
    stream = batches(examples, opts.batch, pad_id, seq=opts.seq, seed=opts.seed, epochs=None,
                     skip=start * opts.grad_accum)
    log_every = opts.log_every or max(1, (opts.steps - start) // 10)
    saved: Path | None = None
    last_loss: float | None = None
    began = time.perf_counter()
    boundary_rng = rng_state()
    interrupted = False
    with _StopFlag(echo) as stop, _Progress(opts.steps, start) as bar, \
            open(out / METRICS, "a", encoding="utf-8") as metrics:
        try:
            while trainer.global_step < opts.steps and not stop.requested:
                t0 = time.perf_counter()
                lr = _current_lr(trainer)  # the scheduler moves it after the step: log the one used
                losses, tokens = [], 0
                for _ in range(opts.grad_accum):
                    batch = next(stream)
                    _, loss = trainer.train_step(batch["input_ids"], labels=batch["labels"],
                                                 attention_mask=batch["attention_mask"])
                    losses.append(loss)
                    tokens += int(batch["attention_mask"].sum())
                seconds = time.perf_counter() - t0
                boundary_rng = rng_state()
                step = trainer.global_step
                last_loss = sum(losses) / len(losses)
                report = getattr(model, "last_report", None)
                peak = getattr(report, "device_peak_bytes", None)
                record = {"step": step, "loss": last_loss, "lr": lr,
                          "tokens_per_s": tokens / seconds if seconds > 0 else None,
                          "device_peak_bytes": peak, "tokens": tokens, "seconds": seconds}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(step, record)
                if not bar.live and (step % log_every == 0 or step == opts.steps):
                    echo(_log_line(record, opts.steps))
                if opts.save_steps and step % opts.save_steps == 0 and step < opts.steps:
                    saved = trainer.save_checkpoint(out / f"checkpoint-{step}", tokenizer_dir=tokenizer_dir)
        except KeyboardInterrupt:
            interrupted = True
            # Roll back to the last optimizer step: drop the partial accumulation so that the
            # checkpoint describes exactly `global_step` steps, RNG included.
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.micro_step = 0
            set_rng_state(boundary_rng)
        interrupted = (interrupted or stop.requested) and trainer.global_step < opts.steps
    step = trainer.global_step
    if interrupted:
        saved = trainer.save_checkpoint(out / f"checkpoint-{step}", tokenizer_dir=tokenizer_dir)
    else:
        saved = trainer.save_checkpoint(out / FINAL, tokenizer_dir=tokenizer_dir)
    return LoopResult(step, last_loss, saved, interrupted, time.perf_counter() - began)


def _current_lr(trainer: Any) -> float:
    return float(trainer.optimizer.param_groups[0]["lr"])


def _log_line(record: dict[str, Any], total: int) -> str:
    from lema.domain.units import format_size

    tps = record.get("tokens_per_s")
    peak = record.get("device_peak_bytes")
    return (f"step {record['step']}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}"
            + (f"  {tps:,.0f} tok/s" if tps else "") + (f"  device {format_size(peak)}" if peak else ""))


class _Progress:
    """A rich progress bar on a terminal's stderr (nothing otherwise: the loop logs lines)."""

    def __init__(self, total: int, start: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.total, self.start = total, start
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> "_Progress":
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                                 console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total, completed=self.start)
        return self

    def update(self, step: int, record: dict[str, Any]) -> None:
        if self._bar is not None:
            from lema.domain.units import format_size

            tps, peak = record.get("tokens_per_s"), record.get("device_peak_bytes")
            text = f"loss {record['loss']:.4f}" + (f" | {tps:,.0f} tok/s" if tps else "") + (
                f" | device {format_size(peak)}" if peak else "")
            self._bar.update(self._task, completed=step, description=text)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()


def plan_summary(model: Any) -> str:
    """A compact plan: strategy, shape, device total against the budget, the verdict."""
    from lema.domain.units import format_size

    p = model.plan()
    s = p.shape
    head = (f"plan: {s.strategy.value} on {model.device.torch_device}, batch {s.batch} x seq {s.seq}, "
            f"LoRA rank {s.lora_rank} ({p.model.lora_parameters:,} trainable parameters), "
            f"{p.model.n_layers} layers, {len(p.resident_units)} units resident")
    if p.budget is None:
        body = f"device {format_size(p.device_total)} needed (no budget to check against)"
    else:
        body = (f"device {format_size(p.device_total)} of {format_size(p.budget.device_bytes)} budget "
                f"(headroom {format_size(p.headroom_bytes)}): {'fits' if p.fits else 'DOES NOT FIT'}")
    return head + "\n      " + body


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
    from lema.config import LemaConfig
    from lema.data.examples import batches_per_epoch, read_examples
    from lema.app.model import LemaModel

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

    gbi_path, name_or_path = resolve_model_arg(model_path)
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
    result = train_loop(model, trainer, dataset.examples, tok.pad_token_id, opts, tok_dir)
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
    changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {args[k]!r}" for k in _DATA_ARGS
               if before.get(k) != args[k]]
    if changed:
        click.echo("warning: resuming with different data options than the original run ("
                   + ", ".join(changed) + "); the batches will not continue where they stopped")


def _check_vocab(dataset: Any, model: Any, data: str) -> None:
    top = max(max(e.input_ids) for e in dataset.examples)
    if top >= model.spec.vocab_size:
        raise DataError(f"{data}: the tokenizer produces token id {top} but the model's vocabulary has "
                        f"{model.spec.vocab_size} entries; pass the model's own tokenizer with --tokenizer")
