"""run_training: the "train a run" use case behind ``lema train``, ``lema demo``'s shell line and the Python API.

A run is a :class:`TrainOptions` (``lema train``'s options as values, with its defaults);
:func:`run_training` checks them, locks ``out`` (rank 0 under torchrun), prepares the data,
builds the model, optimizer, trainer and metric sinks, and runs the loop
(:func:`lema.app.training.train_loop.train_loop`): the same checkpoints, ``metrics.jsonl``
and exit status as the command, which only parses options into it and prints.

Example:
    >>> from lema.app.training.run_training import TrainOptions, run_training
    >>> status = run_training(TrainOptions(model_path="model.safetensors", data="chat.jsonl",  # doctest: +SKIP
    ...                                    out="runs/a", steps=100, batch=2, seq=512))
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import attrs

from lema.adapters.checkpoints.atomic import atomic_write_text
from lema.app.outputs import check_output
from lema.app.training.run_folder import ARGS
from lema.app.training.run_options import TrainOptions
from lema.app.training.run_inputs import (
    check_model_path,
    open_tokenizer,
    resolve_model_arg,
    save_tokenizer_with_template,
)
from lema.app.training.train_loop import (
    DATA_ARGS,
    LoopOptions,
    lr_lambda,
    make_optimizer,
    plan_summary,
    require_bitsandbytes,
    train_loop,
)
from lema.config import LemaConfig, check_seed
from lema.domain.json_values import parse_json
from lema.domain.model.sequence_limit import check_seq
from lema.domain.units import parse_size
from lema.errors import ConfigError, LemaWarning

__all__ = ["EXIT_SIGNAL", "TrainOptions", "run_training"]

EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
Echo = Callable[[str], Any]


def run_training(o: TrainOptions, *, echo: Echo = print, progress: Any = None, hold_signals: bool = False,
                 events: Any = None) -> int:
    """Train the run ``o`` describes, as ``lema train`` does; returns its exit status.

    Args:
        o: the run's options.
        echo: where the run's lines go (``lema train`` prints them).
        progress: a progress display class for the loop (the CLI's bar), or None.
        hold_signals: after a signal stopped the run, leave SIGINT/SIGTERM ignored until the
            process exits (the CLI, which exits next: a second signal cannot kill it mid-exit).
        events: a :class:`~lema.app.training.callbacks.RunEvents` for Python callbacks (:func:`lema.train`).

    Returns:
        0 done (or nothing left to do), 1 a non-finite loss stopped the run (after saving
        the last good step), 130 / 143 stopped by SIGINT / SIGTERM (after saving).

    Raises:
        LemaError: bad options or input, a plan that does not fit, a locked ``out``.
    """
    check_model_path(o.model_path)  # a typo is said at once, not after the torch import
    # Imported here: they import torch, and `lema --help` (which imports this module) must stay light.
    from lema.app import bootstrap
    from lema.app.parallel import distributed
    from lema.app.training.ranked_run import open_ranked_run

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
    if o.overwrite and o.resume:
        raise ConfigError("pass --resume (continue the run in --out) or --overwrite (replace it), not both")
    for each, every in (("--evals-per-epoch", o.eval_steps and o.evals_per_epoch),
                        ("--saves-per-epoch", o.save_steps and o.saves_per_epoch)):
        if every:
            raise ConfigError(f"pass {each} or {'--eval-steps' if 'eval' in each else '--save-steps'}, not both")
    if o.warmup_ratio is not None and o.warmup:
        raise ConfigError("pass --warmup (steps) or --warmup-ratio (a fraction of the steps), not both")
    if o.eval_data is not None and o.eval_split is not None:
        raise ConfigError("pass --eval-data or --eval-split, not both")
    check_seed(o.seed, "--seed")
    o.objective()  # a bad --method/--beta/... is said before anything is opened
    if o.method != "sft" and (o.packing or o.eval_data is not None or o.eval_split is not None):
        raise ConfigError(f"--method {o.method}: --packing, --eval-data and --eval-split apply to sft only")
    if o.precompute_ref and o.method not in ("dpo", "ipo", "kto"):
        raise ConfigError(f"--precompute-ref: --method {o.method} has no reference model (dpo, ipo and kto have)")
    if o.adapter is not None and not Path(o.adapter).expanduser().is_dir():
        raise ConfigError(f"--adapter: {o.adapter} is not a folder (a peft adapter or a LEMA checkpoint)")
    o.max_line_bytes()  # checked before anything is opened
    if o.vram is not None:
        parse_size(o.vram, field="--vram")  # named as the user wrote it, not as LemaConfig's vram_budget
    bootstrap.sink_names(o.report_to)  # an unknown sink or a missing library: said before any work
    if o.optimizer == "adamw8bit":
        require_bitsandbytes()
    out_dir = Path(o.out)
    model_arg = Path(o.model_path).expanduser()
    check_output(out_dir, option="--out", overwrite=None, folders=[model_arg if model_arg.is_dir() else None],
                 files=[model_arg if model_arg.is_file() else None, *map(Path, o.all_data),
                        None if o.eval_data is None else Path(o.eval_data)], replaces_folder=o.overwrite)
    with open_ranked_run(out_dir, resume=o.resume, ranks=ranks, echo=echo, overwrite=o.overwrite) as checkpoint:
        if checkpoint is not None:
            _check_resume_args(out_dir, o.args(), echo)
        code = _train(o, out_dir, checkpoint, ranks, echo, progress, hold_signals, events)
    if code and ranks.distributed:  # stopped early: torchrun ends every rank once one exits non-zero,
        from lema.app.parallel.rank_agreement import farewell  # so wait until rank 0 has saved and unlocked

        farewell()
    return code


def _train(o: TrainOptions, out_dir: Path, ckpt: Path | None, ranks: Any, echo: Echo, progress: Any,
           hold_signals: bool, events: Any = None) -> int:
    """The run itself, in a locked ``out_dir``; returns the exit status."""
    from lema.app import bootstrap
    from lema.app.training.model import LemaModel
    from lema.app.training.run_data import check_vocab, prepare_data
    from lema.data.examples import batches_per_epoch

    gbi_path, name_or_path = resolve_model_arg(o.model_path, echo=echo)
    # The context comes from the header and config alone: a --seq beyond it is refused
    # before the data is read.
    check_seq(o.seq, bootstrap.open_model(LemaConfig(gbi_path=gbi_path, model_name_or_path=name_or_path)).spec,
              lambda line: warnings.warn(line.removeprefix("warning: "), LemaWarning, stacklevel=2))
    tok, tok_dir = open_tokenizer(o.tokenizer, o.model_path)
    objective = o.objective()
    data = _preference_data(o, tok, ranks) if objective is not None else prepare_data(
        o.all_data, tok, seq=o.seq, format=o.format, chat_template=o.chat_template, packing=o.packing,
        eval_data=o.eval_data, eval_split=o.eval_split, seed=o.seed, cache=o.data_cache,
        max_line_bytes=o.max_line_bytes(), progress=echo, weights=o.data_weights, mapping=o.data_mapping(),
        epochs=o.data_epochs)
    per_epoch = batches_per_epoch(len(data.items), o.batch * ranks.world)
    total = o.steps if o.steps is not None else max(1, math.ceil((o.epochs or 1) * per_epoch / o.grad_accum))
    total_per_epoch = max(1, math.ceil(per_epoch / o.grad_accum))  # optimizer steps per epoch
    for line in data.lines:
        echo(line)
    echo(f"      {per_epoch} batches per epoch; {total} optimizer steps")

    runtime = dict(gbi_path=gbi_path, model_name_or_path=name_or_path, strategy=o.strategy, device=o.device,
                   vram_budget=o.vram, prefetch_distance="auto" if o.prefetch is None else o.prefetch, max_seq_len=o.seq,
                   # a preference step's rows: each pair (KTO: each row and its KL row) is two
                   batch_size=o.batch * (2 if objective is not None else 1),
                   preference=None if objective is None else "pairs" if not objective.needs_reference
                   or o.precompute_ref  # the cached column: no reference forward in the passes
                   else "reference" if o.adapter is None else "reference_adapter",
                   offload_activations="auto" if o.offload is None else o.offload, packed_rows=o.packing,
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
        if o.adapter is not None:
            model.load_adapter(o.adapter)  # its rank, alpha and targets; a fresh optimizer
            echo(f"starting from the adapter in {o.adapter}")
        else:
            model.initialize_lora()
    with model:
        echo(plan_summary(model, asked=o.device))
        if model.disk is not None and model.disk.keep is not None:
            echo(model.disk.line())
        if data.store is not None:
            check_vocab(data.store, model.spec.vocab_size, o.data)
        opts = LoopOptions(out=out_dir, steps=total, batch=o.batch, seq=o.seq, lr=o.lr, seed=o.seed,
                           grad_accum=o.grad_accum, save_steps=_per_epoch(o.save_steps, o.saves_per_epoch,
                                                                           total_per_epoch),
                           warmup=o.warmup if o.warmup_ratio is None else math.ceil(o.warmup_ratio * total),
                           lr_schedule=o.lr_schedule, optimizer=o.optimizer, weight_decay=o.weight_decay,
                           eval_steps=_per_epoch(o.eval_steps, o.evals_per_epoch, total_per_epoch),
                           save_total_limit=o.save_total_limit,
                           logging_steps=o.logging_steps or 1)
        optimizer, scheduler = make_optimizer(model, opts)
        with warnings.catch_warnings():
            warnings.simplefilter("always", LemaWarning)  # every run says it (the CLI prints "warning: ...")
            trainer = model.get_trainer(optimizer, scheduler=scheduler, reset_optimizer=o.reset_optimizer)
        items = data.items
        if objective is not None:
            from lema.app.training.preference_step import use_preference

            reference = _reference(model, o) if objective.needs_reference else None
            if o.precompute_ref:
                items = _reference_column(model, data, tok.pad_token_id, reference, o, out_dir, gbi_path or name_or_path,
                                          echo)
                reference = None
            use_preference(trainer, objective, reference)
            trainer.precomputed_reference = o.precompute_ref
        if ranks.distributed:  # every rank is ready (or all stop with the first one's error) before any writes
            from lema.app.parallel.rank_agreement import settle

            settle()
        if ckpt is not None:
            echo(f"resuming from {ckpt} at step {trainer.global_step}"
                       + (" with a fresh optimizer (--reset-optimizer)" if o.reset_optimizer else ""))
            _follow_new_schedule(optimizer, scheduler, trainer.global_step, opts, echo)
        elif ranks.is_main:
            atomic_write_text(out_dir / ARGS, json.dumps(o.args(), indent=2))
        if o.chat_template is not None and ranks.is_main:  # checkpoints carry the template the run trained with
            tok_dir = save_tokenizer_with_template(tok, o.chat_template, out_dir / "tokenizer")
        if trainer.global_step >= total:
            echo(f"already trained {trainer.global_step} steps (asked for {total}); nothing to do")
            return 0
        sinks = bootstrap.make_sinks(o.report_to, out_dir, run_name=o.run_name, options=o.args()) \
            if ranks.is_main else []
        result = train_loop(model, trainer, items, tok.pad_token_id, opts, tok_dir, echo=echo,
                            progress=progress if ranks.is_main else None, collate_fn=data.collate_fn,
                            eval_examples=data.eval_examples, sinks=sinks, hold_signals=hold_signals,
                            events=events)
    if result.interrupted:
        echo(f"interrupted at step {result.steps_done}: saved {result.checkpoint}; continue with the same "
                   "command plus --resume")
        return EXIT_SIGNAL.get(result.signal or "SIGINT", 130)
    echo(f"done: {result.steps_done} steps in {result.seconds:.1f} s, last loss "
               f"{result.last_loss if result.last_loss is None else format(result.last_loss, '.4f')}; "
               f"adapter in {result.checkpoint}")
    return 0


def _preference_data(o: TrainOptions, tok: Any, ranks: Any) -> Any:
    """The run's preference rows (:mod:`lema.data.preference`), as the loop takes them."""
    from lema.app.training.run_data import RunData
    from lema.data.preference import collate_pairs, collate_unpaired, load_preference

    if ranks.distributed:
        raise ConfigError(f"--method {o.method} runs on one process for now (no torchrun)")
    if o.more_data or o.maps_data:
        raise ConfigError(f"--method {o.method} reads one --data file in TRL's preference fields; the data mapping "
                          "and mixing options (--data given twice, --messages-field, --train-on-inputs, ...) are for "
                          "sft: drop them")
    rows = load_preference(o.data, tok, method=o.method, seq=o.seq, batch=o.batch, chat_template=o.chat_template,
                           max_line_bytes=o.max_line_bytes())
    kind = "unpaired rows" if o.method == "kto" else "pairs"
    tokens = sum(len(r) for r in rows)
    line = f"data: {o.data}: {len(rows):,} {kind} ({tokens:,} tokens) for {o.method}"
    return RunData(items=rows, collate_fn=collate_unpaired if o.method == "kto" else collate_pairs,
                   eval_examples=None, store=None, lines=(line,))


def _reference_column(model: Any, data: Any, pad_id: int, reference: Any, o: TrainOptions, out_dir: Path,
                      gbi_path: Any, echo: Echo) -> list[Any]:
    """The examples with their cached reference log-probs (:mod:`lema.app.training.reference_cache`)."""
    from lema.app.training import reference_cache

    weights = Path(gbi_path or o.model_path).expanduser()
    stat = weights.stat()
    key = reference_cache.cache_key(data.items, reference, f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}",
                                    o.seq, o.method)
    return reference_cache.with_reference_column(model, data.items, data.collate_fn, pad_id, o.batch, reference,
                                                 out_dir, key, echo)


def _reference(model: Any, o: TrainOptions) -> Any:
    """The reference model's adapter: a frozen copy of ``--adapter`` (also on --resume), or None (the base)."""
    if o.adapter is None:
        return None
    from lema.adapters.checkpoints.store import read_adapter
    from lema.app.training.preference_step import frozen_adapter

    config, tensors = read_adapter(o.adapter)
    _, state = model.adapter_state(o.adapter, config, tensors)
    return frozen_adapter(state.to(model.device.torch_device))
def _per_epoch(steps: int, per_epoch: int | None, steps_per_epoch: int) -> int:
    """``--eval-steps`` / ``--save-steps`` from ``--evals-per-epoch`` / ``--saves-per-epoch`` N:
    every ``steps_per_epoch / N`` optimizer steps (at least 1), as axolotl spaces them."""
    if not per_epoch:
        return steps
    return max(1, steps_per_epoch // per_epoch)


def _follow_new_schedule(optimizer: Any, scheduler: Any, step: int, opts: LoopOptions, echo: Echo) -> None:
    """On ``--resume`` with another length, the LR of the next step from the new schedule, said.

    The checkpoint holds the LR its own schedule reached (0 at the end of a finished cosine or
    linear run): the next step would train at it before the schedule moved on. The run
    continues on the schedule of this run's ``--steps`` instead, and the line says so.
    """
    if scheduler is None or step >= opts.steps:
        return
    factor = lr_lambda(opts.lr_schedule, opts.warmup, opts.steps)(step)
    before = [float(g["lr"]) for g in optimizer.param_groups]
    after = [float(base) * factor for base in scheduler.base_lrs]
    if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) for a, b in zip(before, after)):
        return
    for group, lr in zip(optimizer.param_groups, after):
        group["lr"] = lr
    scheduler._last_lr = list(after)  # noqa: SLF001 - what get_last_lr() reports
    ended = " (the end of its finished schedule: the next steps would not have trained)" if before[0] == 0 else ""
    echo(f"warning: --resume with --steps {opts.steps}: the checkpoint's {opts.lr_schedule} schedule left the LR at "
         f"{before[0]:.3g}{ended}; the run continues on a {opts.lr_schedule} schedule over {opts.steps} steps, at "
         f"{after[0]:.3g} for step {step + 1} (to keep the old curve, resume with the old --steps)")


def _check_resume_args(out: Path, args: dict[str, Any], echo: Echo) -> None:
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
        echo("warning: resuming with different data options than the original run ("
                   + ", ".join(changed) + "); the batches will not continue where they stopped")
