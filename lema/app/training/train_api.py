"""``lema.train(...)``: a whole training run from Python, with ``lema train``'s options and callbacks.

The run is :func:`~lema.app.training.run_training.run_training`'s (what ``lema train``
runs): the same checks, data preparation, plan, checkpoints, ``metrics.jsonl`` and resume.
Options are :class:`~lema.app.training.run_training.TrainOptions`' fields, named as the
command line's options with ``_`` for ``-`` (``grad_accum=4``, ``eval_split=0.1``,
``lr_schedule="cosine"``); ``format`` and ``offload_activations`` are accepted for
``--format`` and ``--offload-activations``. Callbacks (:class:`~lema.app.training.callbacks.Callback`)
see each step's metrics, each evaluation and each checkpoint, and may stop the run.

Example:
    >>> import lema                                                                   # doctest: +SKIP
    >>> result = lema.train(model="model/", data="chat.jsonl", out="runs/a", steps=100,  # doctest: +SKIP
    ...                     batch=2, seq=512, lr=2e-4, callbacks=[MyCallback()])
    >>> result.checkpoint                                                             # doctest: +SKIP
    PosixPath('runs/a/final')
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs

from lema.app.training.callbacks import Callback, RunEvents
from lema.app.training.run_training import TrainOptions, run_training
from lema.errors import ConfigError

_ALIASES = {"format": "data_format", "offload_activations": "offload"}
_FIXED = ("model_path", "data", "out", "nproc")  # given as arguments, or set by the launcher


@attrs.frozen
class TrainResult:
    """How :func:`train` ended.

    Attributes:
        status: ``lema train``'s exit status: 0 done (or stopped by a callback), 1 a
            non-finite loss stopped the run (after saving the last good step), 130 / 143
            stopped by SIGINT / SIGTERM (after saving a checkpoint to resume from).
        steps: optimizer steps taken (in all, a resumed run's earlier ones included).
        checkpoint: the last checkpoint written (``out/final`` at the end), or None.
        last_loss: the loss of the last step, or None.
        stopped: a callback called ``run.stop()``.
    """

    status: int
    steps: int
    checkpoint: Path | None
    last_loss: float | None
    stopped: bool


def train(model: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str], *,
          callbacks: Iterable[Callback] = (), echo: Callable[[str], Any] | None = print,
          **options: Any) -> TrainResult:
    """Train a LoRA adapter as ``lema train --model MODEL --data DATA --out OUT ...`` does.

    Args:
        model: ``--model``: a model folder, a ``.safetensors`` file or a Hub id.
        data: ``--data``.
        out: ``--out``: the run folder (checkpoints, ``final``, ``metrics.jsonl``).
        callbacks: :class:`~lema.app.training.callbacks.Callback` objects, called in order.
        echo: where the run's lines go (``print`` by default; None for none).
        **options: any other ``lema train`` option, by its name with ``_`` for ``-``
            (``steps``, ``epochs``, ``batch``, ``seq``, ``lr``, ``rank``, ``grad_accum``,
            ``eval_split``, ``save_steps``, ``device``, ``resume``, ...).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: an unknown option (with the nearest known name), or a bad value; and
            whatever ``lema train`` refuses (LemaError subclasses).
    """
    fields = [f.name for f in attrs.fields(TrainOptions) if f.name not in _FIXED]
    given: dict[str, Any] = {}
    for name, value in options.items():
        key = _ALIASES.get(name, name)
        if key not in fields:
            near = difflib.get_close_matches(name, fields + list(_ALIASES), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; the options are: {', '.join(sorted(fields))}"
            raise ConfigError(f"lema.train: unknown option {name!r}{hint}")
        if key in given:
            raise ConfigError(f"lema.train: {name!r} and {key!r} are the same option; pass one")
        given[key] = value
    callbacks = list(callbacks)
    if callbacks and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("lema.train: callbacks run in one process; under torchrun each rank would call them "
                          "and a stop on one rank would leave the others waiting: train without callbacks there")
    opts = TrainOptions(model_path=os.fspath(model), data=os.fspath(data), out=os.fspath(out), **given)
    events = RunEvents(callbacks, Path(out), opts.steps or 0)
    status = run_training(opts, echo=echo if echo is not None else (lambda line: None), events=events)
    return TrainResult(status=status, steps=events.run.step, checkpoint=events.last_checkpoint,
                       last_loss=events.last_loss, stopped=events.stop_requested)
