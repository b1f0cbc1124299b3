"""Turn LEMA's exceptions into one ``Error: ...`` line and an exit status."""

from __future__ import annotations

import warnings

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
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except DoesNotFitError as exc:
            raise CliError(str(exc), EXIT_DOES_NOT_FIT) from None
        except NonFiniteLossError as exc:
            raise CliError(str(exc), EXIT_TRAINING_FAILED) from None
        except LemaError as exc:
            raise CliError(str(exc), EXIT_BAD_INPUT) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(_describe_os_error(exc), EXIT_BAD_INPUT) from None


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
