"""Turn LEMA's exceptions into one ``Error: ...`` line and an exit status.

Under torchrun (several ranks) only rank 0 prints: the other ranks' standard output is
discarded, and an error every rank raised together (one rank's failure, agreed through
:mod:`lema.app.rank_agreement`) ends them with the same status but no message of their own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from typing import Iterator

import click

from lema.errors import DoesNotFitError, LemaError, LemaWarning, NonFiniteLossError

EXIT_DOES_NOT_FIT = 1
EXIT_TRAINING_FAILED = 1
EXIT_BAD_INPUT = 2


class CliError(click.ClickException):
    """A ClickException with a chosen exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class LemaGroup(click.Group):
    """A click group that reports LEMA errors without a traceback."""

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        with _quiet_unless_rank_zero() as quiet:
            try:
                with warnings.catch_warnings():
                    warnings.showwarning = _show_warning
                    return super().invoke(ctx)
            except click.exceptions.Exit:
                raise
            except click.ClickException as exc:
                if quiet:  # every rank parsed the same command line: rank 0 says it
                    raise click.exceptions.Exit(exc.exit_code) from None
                raise
            except Exception as exc:  # noqa: BLE001 - sorted below, the rest re-raised
                raise _translate(exc, quiet) from None


def _exit_code(exc: Exception) -> int:
    if isinstance(exc, DoesNotFitError):
        return EXIT_DOES_NOT_FIT
    if isinstance(exc, NonFiniteLossError):
        return EXIT_TRAINING_FAILED
    if isinstance(exc, (LemaError, OSError, UnicodeDecodeError)):
        return EXIT_BAD_INPUT
    return 1


def _translate(exc: Exception, quiet: bool) -> BaseException:
    agreed = False
    if "torch" in sys.modules:  # without torch there is no process group (and `lema plan` stays light)
        from lema.app.rank_agreement import reported_elsewhere, settle_on_exit, stopping_together

        # A rank failing on its own meets the others at their next collective, so they stop too.
        exc = settle_on_exit(exc)
        agreed = stopping_together(exc)
        quiet = quiet and reported_elsewhere(exc)
    code = _exit_code(exc)
    if isinstance(exc, LemaError):
        out: BaseException = CliError(str(exc), code)
    elif isinstance(exc, (OSError, UnicodeDecodeError)):
        out = CliError(_describe_os_error(exc), code)
    else:
        out = exc
    if not agreed:
        return out
    # Every rank is stopping together: rank 0 says why before any rank exits, since torchrun
    # stops the others as soon as one has gone.
    if not quiet:
        if isinstance(out, click.ClickException):
            out.show()
        else:
            traceback.print_exception(out)
    from lema.app.rank_agreement import farewell

    farewell()
    return click.exceptions.Exit(code)


@contextlib.contextmanager
def _quiet_unless_rank_zero() -> Iterator[bool]:
    """Discard standard output on torchrun ranks other than 0 (yields True there)."""
    rank = os.environ.get("RANK", "0")
    if os.environ.get("WORLD_SIZE", "1") in ("", "1") or rank in ("", "0"):
        yield False
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
        yield True


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # LEMA's own warnings are one line for the user; others keep Python's format.
    if issubclass(category, LemaWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        click.echo(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), err=True)


def _describe_os_error(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file or directory: {exc.filename}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}"
    if isinstance(exc, UnicodeDecodeError):
        return f"input is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    return str(exc)
