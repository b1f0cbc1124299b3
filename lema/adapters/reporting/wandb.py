"""Weights & Biases: a run whose files go under ``--out`` (needs ``pip install 'lema[wandb]'``).

The mode follows wandb's own settings (``WANDB_MODE=offline`` writes a run to sync later;
``wandb login`` or ``WANDB_API_KEY`` for online runs).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from lema.errors import missing_extra


class WandbSink:
    """One wandb run; every value is logged at its step.

    Raises:
        MissingDependencyError: wandb is not installed.
    """

    def __init__(self, directory: str | os.PathLike[str], project: str, name: str | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise missing_extra("wandb", "wandb", "--report-to wandb") from None
        os.makedirs(directory, exist_ok=True)
        self._run = wandb.init(project=project, name=name, dir=str(directory), config=dict(config or {}),
                               reinit="finish_previous")
        self.directory = str(directory)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log({k: float(v) for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        self._run.finish()
