"""What enters the first layer and leaves the last in most Llama-shaped families.

The plain token embedding (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, OLMo 2, Phi-3), the
final RMSNorm (all but OLMo 2 and the Gemmas, whose norms scale differently), and the block
parameters of the families that need no more than these. torch is imported inside the
functions, so a family module (and ``lema plan``) loads without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from lema.domain.model.layout import AttentionLayout

if TYPE_CHECKING:
    import torch

    from lema.domain.model.linear import Weights


@attrs.frozen
class DecoderParams:
    """What a Llama-shaped block reads from the config."""

    layout: AttentionLayout
    eps: float
    activation: str
    head_dim: int
    final_softcap: float | None = None


def token_embedding(p: Any, weights: "Weights", input_ids: "torch.Tensor", position_ids: "torch.Tensor",
                    dtype: "torch.dtype") -> "torch.Tensor":
    """Token embeddings ``(batch, seq, hidden)`` in ``dtype``."""
    import torch.nn.functional as F

    return F.embedding(input_ids, weights["embed_tokens.weight"]).to(dtype)


def rms_final_norm(p: Any, weights: "Weights", x: "torch.Tensor") -> "torch.Tensor":
    """The final RMSNorm (``p.eps``)."""
    from lema.domain.model import norms

    return norms.rms_norm(x, weights["norm.weight"], p.eps)
