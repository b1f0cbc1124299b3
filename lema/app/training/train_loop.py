"""The training loop a command-line run uses (``lema train`` and ``lema demo``).

It runs optimizer steps through a :class:`~lema.app.training.trainer.LemaTrainer`, writes
``metrics.jsonl`` (and the metrics sinks: TensorBoard, wandb), evaluates held-out data
every ``eval_steps``, writes periodic checkpoints (keeping the newest ``save_total_limit``)
and the final one. On Ctrl-C or SIGTERM (what schedulers and ``docker stop`` send) it
rolls back to the last optimizer step and saves a resumable checkpoint; on a non-finite
loss it does the same and raises :class:`~lema.errors.NonFiniteLossError` naming the step
and the checkpoint. The optimizer, the LR schedule and the checkpoint naming live here
too; the run folder (lock, resume point) in :mod:`lema.app.training.run_folder`.

Under torchrun every rank runs this loop on its rows of each batch
(:func:`lema.data.sharding.rank_batches`); rank 0 alone writes ``metrics.jsonl`` and the
checkpoints (the others wait for it inside ``save_checkpoint``). The ranks agree at every
step whether a signal asked any of them to stop, so they stop and save together; a second
Ctrl-C (torchrun forwards its own) ends them without a checkpoint of its own.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs

from lema.app.training.step_time import DiskFeedback, predicted_step_seconds, warm_prediction
from lema.adapters.checkpoints.atomic import atomic_write_text
from lema.app.training.run_folder import FINAL, METRICS, foreign_outputs, prune_checkpoints
from lema.app.training.callbacks import RunEvents
from lema.app.training.loop_lines import Window, log_line, plan_summary  # noqa: F401 - re-exported
from lema.app.training.stop_signals import StopFlag
from lema.domain.json_values import parse_json
from lema.errors import CheckpointError, ConfigError, NonFiniteLossError, missing_extra

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
# Options that change which batches a step sees: a resumed run must use the same values.
DATA_ARGS = ("data", "global_batch", "seq", "grad_accum", "seed", "format", "chat_template", "packing", "eval_split")


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
    logging_steps: int = 1  # a metrics.jsonl record every N optimizer steps (the window's mean loss)
    resume_hint: str = ""
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    eval_steps: int = 0  # 0: evaluate (when there is eval data) at the end only
    save_total_limit: int = 0  # 0: keep every periodic checkpoint


@attrs.frozen
class LoopResult:
    """How a training loop ended; ``signal`` names what interrupted it (``"SIGINT"``,
    ``"SIGTERM"``) or is None."""

    steps_done: int
    last_loss: float | None
    checkpoint: Path | None
    interrupted: bool
    seconds: float
    signal: str | None = None


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


def _trim_metrics(path: Path, keep_through: int) -> None:
    # Steps after the checkpoint we resume from are trained again: drop their old lines.
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(parse_json(line)["step"]) <= keep_through:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def make_optimizer(model: Any, opts: LoopOptions) -> tuple[Any, Any]:
    """The optimizer ``opts.optimizer`` names on the LoRA parameters, and its warmup/decay schedule.

    ``adamw`` (torch), ``adamw8bit`` (bitsandbytes' 8-bit AdamW: a quarter of the state
    memory; runs on CPU and CUDA) or ``sgd`` (no state).

    Raises:
        ConfigError: an unknown optimizer.
        MissingDependencyError: ``adamw8bit`` without bitsandbytes.
    """
    import torch

    params = model.get_trainable_parameters()
    if opts.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    elif opts.optimizer == "adamw8bit":
        optimizer = require_bitsandbytes().optim.AdamW8bit(params, lr=opts.lr, weight_decay=opts.weight_decay)
    elif opts.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=opts.lr, weight_decay=opts.weight_decay)
    else:
        raise ConfigError(f"--optimizer: {opts.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts.lr_schedule, opts.warmup, opts.steps))
    return optimizer, scheduler


def require_bitsandbytes() -> Any:
    """The bitsandbytes module (``--optimizer adamw8bit``), or an error naming the extra."""
    import logging

    # On CPUs with AVX512-BF16 its import tries to fetch an optional 4-bit kernel and logs a
    # warning when it cannot; the 8-bit optimizer does not use that kernel.
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise missing_extra("bitsandbytes", "quant", "--optimizer adamw8bit") from None
    finally:
        log.setLevel(level)
    return bitsandbytes


def evaluate(trainer: Any, examples: Any, pad_id: int, opts: LoopOptions) -> dict[str, float]:
    """Mean token loss and perplexity of the held-out ``examples`` (padded batches, in order)."""
    from lema.data.examples import batches

    return trainer.evaluate(batches(examples, opts.batch, pad_id, seq=opts.seq, shuffle=False))


def train_loop(model: Any, trainer: Any, examples: Any, pad_id: int, opts: LoopOptions,
               tokenizer_dir: Path | None, echo: Callable[[str], None] = print,
               progress: Callable[[int, int], Any] | None = None, *,
               collate_fn: Callable[..., Any] | None = None, eval_examples: Any = None,
               sinks: Sequence[Any] = (), hold_signals: bool = False,
               events: RunEvents | None = None) -> LoopResult:
    """Run optimizer steps ``trainer.global_step + 1 .. opts.steps``: progress, metrics,
    evaluation, periodic checkpoints, and a checkpoint on Ctrl-C (see the module docstring).

    Args:
        examples: the training items (examples, or packed rows with ``collate_fn``).
        echo: where progress lines go (the CLI passes ``click.echo``).
        progress: ``progress(total, start)`` gives a context manager with ``live`` (True when
            it shows the progress itself, so no lines are logged) and ``update(step, record)``;
            None logs lines only. Evaluations are passed to ``update`` too (records with
            ``eval_loss``).
        collate_fn: makes a batch of items (default: padded examples).
        eval_examples: held-out examples, evaluated every ``opts.eval_steps`` and at the end.
        sinks: :class:`~lema.ports.metrics.MetricsSink` objects that also get every record.
        hold_signals: after a signal stopped the run, leave SIGINT/SIGTERM ignored (the CLI exits next).
        events: a :class:`~lema.app.training.callbacks.RunEvents` (Python callbacks: log, evaluate,
            save, and a stop that ends the run early as a finished one).

    Raises:
        CheckpointError: before the first step, when ``opts.out`` holds something LEMA did not
            write named like a checkpoint this run would save (``checkpoint-<step>``, ``final``).
    """
    from lema.app.parallel import distributed
    from lema.data.examples import batches_per_epoch
    from lema.data.sharding import rank_batches

    ranks = distributed.current()
    out = opts.out
    start = trainer.global_step
    events = RunEvents((), out, opts.steps) if events is None else events
    events.start(opts.steps, start)
    if trainer.micro_step:
        raise CheckpointError("the checkpoint was saved in the middle of a gradient accumulation; "
                              "resume from an earlier checkpoint")
    if ranks.is_main:
        foreign = foreign_outputs(out, start, opts.steps)
        if foreign:
            shown = ", ".join(p.name for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CheckpointError(f"{out} holds {shown}, named like a checkpoint this run would save but not one "
                                  "LEMA wrote; LEMA does not replace it: move it out of the run folder")
        out.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out / METRICS, start)
    stream = rank_batches(examples, opts.batch, pad_id, rank=ranks.rank, world=ranks.world, seq=opts.seq,
                          seed=opts.seed, epochs=None, skip=start * opts.grad_accum, collate_fn=collate_fn)
    log_every = opts.log_every or max(1, (opts.steps - start) // 10)
    if opts.logging_steps > 1:  # --logging-steps N: a log line with each record
        log_every = opts.logging_steps
    began = time.perf_counter()
    bar_cm = progress(opts.steps, start) if progress is not None else _NoProgress()
    metrics_cm = open(out / METRICS, "a", encoding="utf-8") if ranks.is_main else _NoMetrics()
    # The handlers stay installed through the final save (see lema.app.training.stop_signals).
    with StopFlag(echo, hold=hold_signals) as stop:
        previous_hook = trainer.before_optimizer_step
        trainer.before_optimizer_step = stop.commit
        try:
            saved, last_loss, interrupted, failure, stopping = _run_steps(
                model, trainer, stream, opts, ranks, stop, bar_cm, metrics_cm, echo, log_every, sinks,
                eval_examples, pad_id, tokenizer_dir, events,
                per_epoch=batches_per_epoch(len(examples), opts.batch * ranks.world))
        finally:
            trainer.before_optimizer_step = previous_hook
        step = trainer.global_step
        for sink in sinks:
            sink.close()
        if interrupted:
            saved = trainer.save_checkpoint(out / f"checkpoint-{step}", tokenizer_dir=tokenizer_dir,
                                            keep_existing=True)  # never over a checkpoint (issue 25)
        else:
            saved = trainer.save_checkpoint(out / FINAL, tokenizer_dir=tokenizer_dir)
        events.saved(saved)
    if failure is not None:
        raise NonFiniteLossError(f"{failure}; the last good step ({step}) is saved in {saved}",
                                 step=failure.step, value=failure.value, checkpoint=saved) from None
    return LoopResult(step, last_loss, saved, interrupted, time.perf_counter() - began,
                      signal=(stop.signal or ("SIGTERM" if stopping else None)) if interrupted else None)


def _run_steps(model: Any, trainer: Any, stream: Any, opts: LoopOptions, ranks: Any, stop: StopFlag, bar_cm: Any,
               metrics_cm: Any, echo: Callable[[str], None], log_every: int, sinks: Sequence[Any],
               eval_examples: Any, pad_id: int, tokenizer_dir: Path | None, events: RunEvents, *, per_epoch: int = 0
               ) -> tuple[Path | None, float | None, bool, NonFiniteLossError | None, bool]:
    """The steps of :func:`train_loop`: the last periodic checkpoint, the last loss, whether the
    run stopped early, the failure that stopped it, and whether the ranks agreed to stop."""
    out = opts.out
    saved: Path | None = None
    last_loss: float | None = None
    boundary_rng = trainer.rng_snapshot()
    window = Window()
    start, began = trainer.global_step, time.perf_counter()
    interrupted = False
    failure: NonFiniteLossError | None = None
    stopping = False
    predicted, first = predicted_step_seconds(model, opts.grad_accum), trainer.global_step
    feedback = DiskFeedback(model, opts.grad_accum)  # the drive's rate this run sees replaces the plan's
    with bar_cm as bar, metrics_cm as metrics:
        try:
            while (trainer.global_step < opts.steps and not (stopping := _stop_agreed(stop, ranks))
                   and not events.stop_requested):
                feedback.begin()
                t0 = time.perf_counter()
                lr = _current_lr(trainer)  # the scheduler moves it after the step: log the one used
                losses, tokens = [], 0
                for _ in range(opts.grad_accum):
                    with stop.interruptible():  # a second signal may stop a micro-batch, not a step
                        batch = next(stream)
                        inputs = {k: batch[k] for k in ("position_ids", "desirable", "reference") if k in batch}
                        _, loss = trainer.train_step(batch["input_ids"], labels=batch["labels"],
                                                     attention_mask=batch["attention_mask"], **inputs)
                    losses.append(loss)
                    tokens += int(batch["tokens"])  # the whole batch's, over all ranks
                seconds = time.perf_counter() - t0
                predicted = feedback.after(seconds, predicted)
                boundary_rng = trainer.rng_snapshot()
                step = trainer.global_step
                last_loss = sum(losses) / len(losses)
                report = getattr(model, "last_report", None)
                peak = getattr(report, "device_peak_bytes", None)
                counted = bool(getattr(report, "peak_counts_compute", True))
                window.add(last_loss, tokens, seconds)
                elapsed = time.perf_counter() - began
                record = {"step": step, "loss": last_loss, "lr": lr,
                          "grad_norm": getattr(trainer, "last_grad_norm", None),
                          **({"loss_scale": trainer.scaler.scale, "skipped_steps": trainer.scaler.skipped}
                             if getattr(trainer, "scaler", None) is not None else {}),  # float16 runs
                          "epoch": None if not per_epoch else round(step * opts.grad_accum / per_epoch, 4),
                          "tokens_per_s": tokens / seconds if seconds > 0 else None,
                          "device_peak_bytes": peak, "device_peak_counts_compute": counted, "tokens": tokens,
                          "seconds": seconds,
                          "eta_s": elapsed / (step - start) * (opts.steps - step) if step > start else None,
                          **warm_prediction(predicted, step, first),
                          **getattr(trainer, "step_metrics", {})}  # preference methods' values
                if step % opts.logging_steps == 0 or step == opts.steps:
                    record.update(window.take())  # the mean loss (and the tokens/s) of the steps since the last record
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    _to_sinks(sinks, step, record, "train/")
                    events.log(record)
                    if not bar.live and (step % log_every == 0 or step == opts.steps):
                        echo(log_line(record, opts.steps, elapsed))
                bar.update(step, record)
                if eval_examples is not None and (step == opts.steps or (opts.eval_steps and step % opts.eval_steps == 0)):
                    scores = evaluate(trainer, eval_examples, pad_id, opts)
                    row = {"step": step, "eval_loss": scores["loss"], "eval_perplexity": scores["perplexity"]}
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    _to_sinks(sinks, step, {"loss": scores["loss"], "perplexity": scores["perplexity"]}, "eval/")
                    events.evaluate(row)
                    bar.update(step, row)
                    echo(f"step {step}/{opts.steps}  eval_loss {scores['loss']:.4f}  "
                         f"perplexity {scores['perplexity']:.2f}")
                if opts.save_steps and step % opts.save_steps == 0 and step < opts.steps:
                    saved = trainer.save_checkpoint(out / f"checkpoint-{step}", tokenizer_dir=tokenizer_dir)
                    events.saved(saved)
                    if ranks.is_main:
                        prune_checkpoints(out, opts.save_total_limit)
        except (KeyboardInterrupt, NonFiniteLossError) as exc:
            if ranks.distributed and isinstance(exc, KeyboardInterrupt):
                raise  # the ranks are at different points: no collective save
            interrupted = True
            if isinstance(exc, NonFiniteLossError):
                failure = exc
            # Roll back to the last optimizer step: drop the partial accumulation so that the
            # checkpoint describes exactly `global_step` steps, RNG included.
            trainer.discard_accumulation()
            trainer.restore_rng(boundary_rng)
        interrupted = (interrupted or stopping) and trainer.global_step < opts.steps
    return saved, last_loss, interrupted, failure, stopping


def _stop_agreed(stop: StopFlag, ranks: Any) -> bool:
    """Whether a signal asked this rank (or, under torchrun, any rank) to stop."""
    if not ranks.distributed:
        return stop.requested
    from lema.app.parallel.rank_agreement import settle

    return settle(None, [float(stop.requested)])[0] > 0


def _to_sinks(sinks: Sequence[Any], step: int, record: dict[str, Any], prefix: str) -> None:
    values = {f"{prefix}{k}": v for k, v in record.items()
              if k not in ("step", "seconds", "tokens") and isinstance(v, (int, float)) and v is not None}
    for sink in sinks:
        sink.log(step, values)


def _current_lr(trainer: Any) -> float:
    return float(trainer.optimizer.param_groups[0]["lr"])


class _NoMetrics:
    """Where ranks other than 0 write their metrics: nowhere."""

    def __enter__(self) -> "_NoMetrics":
        return self

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        pass


class _NoProgress:
    """No progress display: the loop logs lines instead."""

    live = False

    def __enter__(self) -> "_NoProgress":
        return self

    def update(self, step: int, record: dict[str, Any]) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        pass
