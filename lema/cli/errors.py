"""Turn every error of a command into one ``Error: ...`` line and an exit status, never a traceback.

* 1: the plan does not fit (:class:`~lema.errors.DoesNotFitError`, whose explanation keeps
  its lines), or training stopped on a non-finite loss (:class:`~lema.errors.NonFiniteLossError`);
* 2: bad input: any other :class:`~lema.errors.LemaError`, a file the system refuses
  (missing, unreadable, a full disk), or a bad option (click's usage errors, shown as one
  line that points at ``--help``);
* 1 also for anything else, which is a bug in LEMA: the line names the exception and
  ``LEMA_DEBUG=1`` shows the traceback.

Under torchrun (several ranks) only rank 0 prints: the other ranks' standard output is
discarded, and an error every rank raised together (one rank's failure, agreed through
:mod:`lema.app.parallel.rank_agreement`) ends them with the same status but no message of their own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
import warnings
from typing import Iterator

import click

from lema.adapters.weights import file_lease
from lema.errors import DoesNotFitError, LemaError, LemaWarning, NonFiniteLossError

EXIT_DOES_NOT_FIT = 1
EXIT_TRAINING_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


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
                with warnings.catch_warnings(), file_lease.guarding():
                    warnings.showwarning = _show_warning
                    return super().invoke(ctx)
            except click.exceptions.Exit:
                raise
            except click.UsageError as exc:
                if quiet:
                    raise click.exceptions.Exit(EXIT_BAD_INPUT) from None
                command = (f"lema {exc.ctx.info_name} --help" if exc.ctx is not None and exc.ctx.parent
                           else "lema --help")
                raise CliError(f"{one_line(exc.format_message())} (see `{command}`)", EXIT_BAD_INPUT) from None
            except click.ClickException as exc:
                if quiet:  # every rank parsed the same command line: rank 0 says it
                    raise click.exceptions.Exit(exc.exit_code) from None
                raise
            except Exception as exc:  # noqa: BLE001 - sorted in _translate: none ends in a traceback
                raise _translate(exc, quiet) from None


def _exit_code(exc: Exception) -> int:
    if isinstance(exc, DoesNotFitError):
        return EXIT_DOES_NOT_FIT
    if isinstance(exc, NonFiniteLossError):
        return EXIT_TRAINING_FAILED
    if isinstance(exc, (LemaError, OSError, UnicodeError)):
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def _translate(exc: Exception, quiet: bool) -> BaseException:
    agreed = False
    if "torch" in sys.modules:  # without torch there is no process group (and `lema plan` stays light)
        from lema.app.parallel.rank_agreement import reported_elsewhere, settle_on_exit, stopping_together

        # A rank failing on its own meets the others at their next collective, so they stop too.
        exc = settle_on_exit(exc)
        agreed = stopping_together(exc)
        quiet = quiet and reported_elsewhere(exc)
    code = _exit_code(exc)
    if isinstance(exc, DoesNotFitError):
        out: BaseException = CliError(str(exc), code)  # the plan's explanation keeps its lines
    elif isinstance(exc, LemaError):
        out = CliError(one_line(str(exc)), code)
    elif isinstance(exc, (OSError, UnicodeError)):
        out = CliError(one_line(_describe_os_error(exc)), code)
    elif os.environ.get("LEMA_DEBUG"):
        out = exc
    else:  # the last line of defence against a traceback: a bug, said in one line
        detail = one_line(str(exc))[:300] or "no message"
        out = CliError(f"internal error ({type(exc).__name__}: {detail}); this is a bug in LEMA: please report "
                       "it (LEMA_DEBUG=1 shows the traceback)", code)
    if not agreed:
        return out
    # Every rank is stopping together: rank 0 says why before any rank exits, since torchrun
    # stops the others as soon as one has gone.
    if not quiet:
        if isinstance(out, click.ClickException):
            out.show()
        else:
            traceback.print_exception(out)
    from lema.app.parallel.rank_agreement import farewell

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


def one_line(text: str) -> str:
    """``text`` on one line, printable whatever bytes it holds (unpaired surrogates escaped)."""
    flat = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return flat.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe_os_error(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file or directory: {exc.filename}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}"
    if isinstance(exc, UnicodeDecodeError):
        return f"input is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        # shutil's copies name the source first and the destination (the file written) second
        written = exc.filename2 or exc.filename
        where = f"{written}: " if written else "writing an output: "
        return f"{where}{os.strerror(exc.errno)}; free some disk space or write elsewhere"
    if isinstance(exc, OSError) and exc.errno and exc.filename:
        return f"{exc.filename}: {os.strerror(exc.errno)}"
    return str(exc)
