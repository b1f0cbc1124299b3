"""Objective: what a training step minimises, computed at the head from the last layer's output.

An objective is a small record the training pass calls at the turn (the head unit): it
returns the summed loss and how many targets it counts, names the metrics it logs, and says
how many extra forward passes a step needs (a preference objective's reference model; none
for next-token cross-entropy). The loss is differentiable with respect to the hidden
states, which the pass backpropagates through the layers in reverse.

Adding one (say DPO) is one module of :mod:`lema.domain.objectives` with a record of this
shape, and its tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol

if TYPE_CHECKING:
    import torch

    from lema.domain.model.spec import ModelSpec


class Objective(Protocol):
    """A training objective (see the module docstring)."""

    @property
    def name(self) -> str:
        """Its name (``"next_token"``)."""
        ...

    @property
    def logs(self) -> tuple[str, ...]:
        """The metrics it adds to each step's line (``("loss",)``)."""
        ...

    @property
    def extra_forward_passes(self) -> int:
        """Forward passes a step needs beyond the trained model's one (a reference model's)."""
        ...

    def loss(self, spec: ModelSpec, head: Mapping[str, torch.Tensor], x: torch.Tensor, targets: torch.Tensor,
             chunk_tokens: int, matmul_dtype: torch.dtype | None, n_tokens: int | None = None
             ) -> tuple[torch.Tensor, int]:
        """The summed loss and the number of targets it counts.

        Args:
            spec: the model.
            head: the head unit's tensors (final norm, ``lm_head.weight``).
            x: ``(batch, seq, hidden)`` output of the last decoder layer (requires grad).
            targets: ``(batch, seq)`` per-position targets of the batch (``-100``: none).
            chunk_tokens: tokens per chunk of the vocabulary projection.
            matmul_dtype: a wider dtype for the products, or None.
            n_tokens: the count of targets other than ``-100`` when the caller has it from the
                host (no device read); None: the objective counts them.
        """
        ...
