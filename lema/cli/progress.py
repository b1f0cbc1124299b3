"""The training progress bar the CLI shows on a terminal."""

from __future__ import annotations

from typing import Any


def columns(total: int) -> list[Any]:
    """The bar's columns: the step count, elapsed time and ETA keep their width; the
    description (loss, tokens/s, device memory) takes what is left and is cut with an
    ellipsis (at 80 columns the counts and times stay whole)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Column

    def fixed(width: int) -> Column:
        return Column(no_wrap=True, min_width=width)

    return [TextColumn("[bold]training", table_column=fixed(8)),
            MofNCompleteColumn(table_column=fixed(2 * len(str(total)) + 1)),
            TimeElapsedColumn(table_column=fixed(7)), TextColumn("ETA", table_column=fixed(3)),
            TimeRemainingColumn(table_column=fixed(7)), BarColumn(bar_width=10, table_column=fixed(10)),
            TextColumn("{task.description}", table_column=Column(no_wrap=True))]


def fixed_width(total: int) -> int:
    """The columns before the description, with their padding."""
    return 8 + 2 * len(str(total)) + 1 + 7 + 3 + 7 + 10 + 6


def fit(text: str, room: int) -> str:
    """``text`` cut to ``room`` characters, with an ellipsis when cut."""
    return text if len(text) <= room else (text[:max(0, room - 1)] + "…" if room > 0 else "")


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

            self._bar = Progress(*columns(self.total), console=self.console)
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
            room = self.console.width - fixed_width(self.total) - 1
            self._bar.update(self._task, completed=step, description=fit(text, room))

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
