"""The exception hierarchy of LEMA.

Every error a user can cause derives from :class:`LemaError` and from the builtin it most
resembles, so ``except ValueError`` keeps working for callers who do not know LEMA. Messages
name the thing, the value, the bound and the fix; the CLI prints them as one
``Error: ...`` line.
"""

from __future__ import annotations


class LemaError(Exception):
    """Base class of every error LEMA raises on purpose."""


class ConfigError(LemaError, ValueError):
    """A configuration value (or a size string, or a CLI option) is invalid."""


class ModelFormatError(LemaError, ValueError):
    """A model file or folder is missing, corrupt, or not an architecture LEMA knows."""


class DoesNotFitError(LemaError, MemoryError):
    """The memory plan does not fit the device (or host) budget.

    Attributes:
        plan: the :class:`lema.domain.plan.planner.MemoryPlan` that did not fit, if known.
    """

    def __init__(self, message: str, plan: object | None = None) -> None:
        super().__init__(message)
        self.plan = plan


class HostMemoryError(LemaError, MemoryError):
    """The run needs more host RAM than the machine has left (checked before anything loads).

    Attributes:
        needed, available: bytes.
    """

    def __init__(self, message: str, needed: int = 0, available: int = 0) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class DeviceOutOfMemory(LemaError, MemoryError):
    """A device was asked to hold more bytes than its capacity."""


class CheckpointError(LemaError, ValueError):
    """A checkpoint or adapter directory is missing, corrupt, or for another model."""


class DataError(LemaError, ValueError):
    """A training data file is empty, malformed, or not UTF-8."""


class PinningRefused(LemaError, MemoryError):
    """The system refused to page-lock host memory (a locked-memory limit, or no driver)."""


class LemaWarning(UserWarning):
    """Something LEMA worked around; the run goes on (the CLI prints it as one line)."""


class OutputError(LemaError, ValueError):
    """An output path would overwrite or delete an input, or replace existing data the user
    did not ask to replace (``--overwrite`` / ``overwrite=True``)."""


class RunInUseError(LemaError, RuntimeError):
    """Another live process holds the lock on a training run folder."""


class NonFiniteLossError(LemaError, FloatingPointError):
    """A training step produced a non-finite (inf/NaN) loss or gradient; the optimizer was
    not stepped with it.

    Attributes:
        step: the optimizer step that failed (``global_step + 1`` when it was raised).
        value: the offending loss (or gradient norm) as a float.
        checkpoint: where the last good state was saved, when a training loop saved it.
    """

    def __init__(self, message: str, *, step: int, value: float, checkpoint: object | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.value = value
        self.checkpoint = checkpoint


class BaseDropoutWarning(LemaWarning):
    """The base model's config sets dropouts that LEMA's training does not apply."""


class RankFailedError(LemaError, RuntimeError):
    """Another rank of a data-parallel run (torchrun) failed, so this one stops too.

    The message names the rank and carries its error; the CLI prints it once, on rank 0.
    """


class MissingDependencyError(LemaError, ImportError):
    """An optional library a feature needs is not installed (the message names the extra)."""


def missing_extra(package: str, extra: str, purpose: str) -> MissingDependencyError:
    """The error for ``purpose`` needing ``package``, installed by ``pip install 'lema[extra]'``.

    Example:
        >>> str(missing_extra("datasets", "data", "reading .parquet files"))
        "reading .parquet files needs the optional package 'datasets': pip install 'lema[data]'"
    """
    return MissingDependencyError(f"{purpose} needs the optional package {package!r}: pip install 'lema[{extra}]'")
