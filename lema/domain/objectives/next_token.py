"""Next-token cross-entropy, the supervised fine-tuning objective (the first :class:`Objective`).

The head's chunked loss (:func:`lema.domain.model.heads.head_loss`): the full float32 logits
never exist; ``loss_sum / n_tokens`` is transformers' ``model(input_ids, labels=labels).loss``.

Example:
    >>> NEXT_TOKEN.name, NEXT_TOKEN.logs, NEXT_TOKEN.extra_forward_passes
    ('next_token', ('loss',), 0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import attrs

from lema.domain.model import heads

if TYPE_CHECKING:
    import torch

    from lema.domain.model.spec import ModelSpec

__all__ = ["NEXT_TOKEN", "NextTokenCrossEntropy"]


@attrs.frozen
class NextTokenCrossEntropy:
    """Summed cross-entropy of each position's logits against its (shifted) target."""

    name: str = "next_token"
    logs: tuple[str, ...] = ("loss",)
    extra_forward_passes: int = 0

    def loss(self, spec: ModelSpec, head: Mapping[str, torch.Tensor], x: torch.Tensor, targets: torch.Tensor,
             chunk_tokens: int, matmul_dtype: torch.dtype | None, n_tokens: int | None = None
             ) -> tuple[torch.Tensor, int]:
        """See :meth:`lema.domain.objectives.objective.Objective.loss`."""
        return heads.head_loss(spec, head, x, targets, chunk_tokens, matmul_dtype=matmul_dtype, n_tokens=n_tokens)


NEXT_TOKEN = NextTokenCrossEntropy()
