"""TensorBoard: scalars written as event files by ``torch.utils.tensorboard`` (needs the
``tensorboard`` package: ``pip install 'lema[tensorboard]'``).

Example:
    >>> sink = TensorBoardSink("runs/a/tensorboard")  # doctest: +SKIP
    >>> sink.log(1, {"train/loss": 2.5}); sink.close()  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from lema.errors import missing_extra


class TensorBoardSink:
    """Writes each value as a scalar summary under ``log_dir``.

    Raises:
        MissingDependencyError: tensorboard is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike[str], hparams: Mapping[str, Any] | None = None) -> None:
        try:
            import tensorboard  # noqa: F401 - torch's writer needs it and says so less clearly
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_extra("tensorboard", "tensorboard", "--report-to tensorboard") from None
        self.log_dir = str(log_dir)
        self._writer = SummaryWriter(log_dir=self.log_dir)
        if hparams:
            text = "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items()))
            self._writer.add_text("run/options", f"```\n{text}\n```", 0)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(name, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
