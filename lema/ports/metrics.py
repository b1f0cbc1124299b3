"""MetricsSink: where a training run's numbers go besides ``metrics.jsonl``.

Adapters: :class:`lema.adapters.reporting.tensorboard.TensorBoardSink` (event files under
``--out``) and :class:`lema.adapters.reporting.wandb.WandbSink` (a Weights & Biases run).
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable


@runtime_checkable
class MetricsSink(Protocol):
    """Takes named scalars at an optimizer step (``train/loss``, ``eval/loss``, ...)."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``values`` at ``step``."""
        ...

    def close(self) -> None:
        """Flush and release whatever the sink holds (files, a run)."""
        ...
