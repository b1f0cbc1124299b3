"""Callbacks for Python users of a training run (:func:`lema.train`).

Subclass :class:`Callback` and override what you need; each hook gets the :class:`Run`
(its step, total steps, output folder, and :meth:`Run.stop`) and what happened::

    class StopWhenLow(lema.Callback):
        def on_log(self, run, metrics):
            if metrics["loss"] < 1.5:
                run.stop()  # after this step: the adapter is saved in out/final

    lema.train(model="model/", data="chat.jsonl", out="runs/a", steps=500, callbacks=[StopWhenLow()])

``on_log`` gets each optimizer step's ``metrics.jsonl`` record (``step``, ``loss``, ``lr``,
``tokens_per_s``, ``device_peak_bytes``, ...), ``on_evaluate`` each evaluation's
(``step``, ``eval_loss``, ``eval_perplexity``), ``on_save`` the folder of each checkpoint
written (periodic ones and the last). An exception raised by a hook stops the run there,
as any error of the loop does (the last periodic checkpoint stays).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping


class Run:
    """The run a callback is called for.

    Attributes:
        out: the run's output folder.
        total_steps: the optimizer steps the run is set to take.
        step: the optimizer steps taken so far.
        should_stop: :meth:`stop` was called.
    """

    def __init__(self, out: Path, total_steps: int) -> None:
        self.out = out
        self.total_steps = total_steps
        self.step = 0
        self.should_stop = False

    def stop(self) -> None:
        """End the run after the step under way (its evaluation and periodic save included);
        the adapter is saved in ``out/final`` as at the end of a run, and ``lema.train``
        returns with ``stopped=True``."""
        self.should_stop = True


class Callback:
    """Hooks a training run calls; the defaults do nothing."""

    def on_log(self, run: Run, metrics: Mapping[str, Any]) -> None:
        """After each optimizer step, with its metrics record."""

    def on_evaluate(self, run: Run, metrics: Mapping[str, Any]) -> None:
        """After each evaluation of the held-out data."""

    def on_save(self, run: Run, path: Path) -> None:
        """After a checkpoint was written to ``path`` (a peft adapter folder and the resume state)."""


class RunEvents:
    """What the training loop calls: passes each event to every callback, in order."""

    def __init__(self, callbacks: Iterable[Callback], out: Path, total_steps: int) -> None:
        self.callbacks = list(callbacks)
        self.run = Run(out, total_steps)
        self.last_checkpoint: Path | None = None
        self.last_loss: float | None = None

    def start(self, total_steps: int, step: int) -> None:
        """The loop begins at optimizer step ``step`` of ``total_steps``."""
        self.run.total_steps, self.run.step = total_steps, step

    @property
    def stop_requested(self) -> bool:
        return self.run.should_stop

    def log(self, record: Mapping[str, Any]) -> None:
        self.run.step = int(record["step"])
        self.last_loss = record.get("loss")
        for callback in self.callbacks:
            callback.on_log(self.run, dict(record))

    def evaluate(self, row: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_evaluate(self.run, dict(row))

    def saved(self, path: Path | None) -> None:
        if path is None:
            return
        self.last_checkpoint = Path(path)
        for callback in self.callbacks:
            callback.on_save(self.run, Path(path))
