"""The training progress bar the CLI shows on a terminal."""

from __future__ import annotations

from typing import Any


class TrainingProgress:
    """A rich progress bar on a terminal's stderr (nothing otherwise: the loop logs lines)."""

    def __init__(self, total: int, start: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.total, self.start = total, start
        self._bar: Any = None
        self._task: Any = None
        self._eval = ""

    def __enter__(self) -> "TrainingProgress":
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                                 console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total, completed=self.start)
        return self

    def update(self, step: int, record: dict[str, Any]) -> None:
        """Show a training record (loss, tokens/s, device memory) or an evaluation's loss."""
        if "eval_loss" in record:
            self._eval = f" | eval {record['eval_loss']:.4f}"
            return
        if self._bar is not None:
            from lema.app.training.step_time import peak_text, time_text

            tps, peak = record.get("tokens_per_s"), record.get("device_peak_bytes")
            text = f"loss {record['loss']:.4f}" + self._eval + (f" | {tps:,.0f} tok/s" if tps else "") + (
                f" | device {peak_text(record)}" if peak else "") + time_text(record, " | ")
            self._bar.update(self._task, completed=step, description=text)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
