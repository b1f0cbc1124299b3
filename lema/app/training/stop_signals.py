"""Ctrl-C and SIGTERM during a training loop: stop at a step boundary, save, exit 130/143.

The first SIGINT or SIGTERM asks the loop to stop after the optimizer step under way. A
second one stops at once, but only where that loses nothing: while a micro-batch's
forward and backward run (:meth:`StopFlag.interruptible`), before the optimizer step
begins (:meth:`StopFlag.commit`). Anywhere else (the optimizer step itself, writing the
step's metrics line, an evaluation, a checkpoint save) it is noted and the loop stops at
the next boundary as asked: a half-applied optimizer step, a step without its metrics line
or a half-written checkpoint would each break the exact resume.

The handlers stay installed until the loop's final save is written; the command line keeps
them (:meth:`StopFlag.hold`) until the process exits, so a signal after the save cannot
turn exit status 143 into death by the signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterator


class StopFlag:
    """The signal handlers of one training loop (installed only in the main thread, where
    signals arrive).

    Attributes:
        requested: a signal asked the loop to stop.
        signal: the name of the first signal (``"SIGINT"``, ``"SIGTERM"``) or None.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, echo: Callable[[str], None], *, hold: bool = False) -> None:
        """``hold``: once a signal stopped the loop, leave the signals ignored on exit (the
        process exits next) instead of restoring the previous handlers."""
        self.requested = False
        self.signal: str | None = None
        self._echo = echo
        self._hold = hold
        self._can_raise = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if self._can_raise:
                self._can_raise = False
                raise KeyboardInterrupt
            return  # noted: the loop stops at the next boundary anyway
        self.requested = True
        self.signal = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        line = f"{self.signal}: stopping after this step and saving a checkpoint ({again} again to stop at once)"
        try:
            self._echo(line)
        except RuntimeError:  # the signal came while that stream was writing (a reentrant write)
            os.write(2, (line + "\n").encode())

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A second signal inside this block raises KeyboardInterrupt (until :meth:`commit`)."""
        self._can_raise = True
        try:
            yield
        finally:
            self._can_raise = False

    def commit(self) -> None:
        """The optimizer step begins: from here to the end of the block, no interruption."""
        self._can_raise = False

    def __exit__(self, *exc: Any) -> None:
        self._can_raise = False
        for signum, previous in self._previous.items():
            if self._hold and self.requested:
                # The process is about to exit with 130/143: a later signal changes nothing.
                # SIG_IGN, not a Python function: the interpreter's shutdown puts SIG_DFL back
                # in place of Python handlers, and a signal then would kill the process.
                signal.signal(signum, signal.SIG_IGN)
            else:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
