"""A micro-batch between its preparation and its pass, and the pass wrapped to cast weights
(the parts of :class:`~lema.app.training.trainer.LemaTrainer`'s micro-step it hands on)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lema.app.runtime.training_pass import TrainingPass
    from lema.app.training.trainable import TrainableModel


class PreparedBatch:
    """A micro-batch validated and embedded on the device, waiting for its pass."""

    def __init__(self, ctx: Any, x0: torch.Tensor, targets: torch.Tensor, n_tokens: int) -> None:
        self.ctx, self.x0, self.targets, self.n_tokens = ctx, x0, targets, n_tokens

    def release(self) -> None:
        """Drop the references (the training pass holds what it still needs)."""
        self.ctx = self.x0 = self.targets = None


def step_with_cast(model: TrainableModel, step: TrainingPass):
    """Wrap a training pass so weights are cast to the model's compute dtype first."""

    def compute(phase, unit, weights):
        step(phase, unit, model.cast_weights(weights))

    return compute
