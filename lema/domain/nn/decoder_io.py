"""What enters the first layer and leaves the last in most Llama-shaped families.

The plain token embedding (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, OLMo 2, Phi-3), the
final RMSNorm (all but OLMo 2 and the Gemmas, whose norms scale differently), the Gemmas'
scaled embedding and ``1 + w`` final norm, and the block parameters of the families that
need no more than these. torch is imported inside the
functions, so a family module (and ``lema plan``) loads without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import attrs

from lema.domain.nn.layout import AttentionLayout

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.linear import Weights


@attrs.frozen
class DecoderParams:
    """What a Llama-shaped block reads from the config."""

    layout: AttentionLayout
    eps: float
    activation: str
    head_dim: int
    final_softcap: float | None = None


class NormParams(Protocol):
    """Parameters with a norm epsilon (every family's but GPT-2's final norm reads it)."""

    @property
    def eps(self) -> float: ...


def token_embedding(p: object, weights: "Weights", input_ids: "torch.Tensor", position_ids: "torch.Tensor",
                    dtype: "torch.dtype") -> "torch.Tensor":
    """Token embeddings ``(batch, seq, hidden)`` in ``dtype``."""
    import torch.nn.functional as F

    return F.embedding(input_ids, weights["embed_tokens.weight"]).to(dtype)


def rms_final_norm(p: NormParams, weights: "Weights", x: "torch.Tensor") -> "torch.Tensor":
    """The final RMSNorm (``p.eps``)."""
    from lema.domain.nn import norms

    return norms.rms_norm(x, weights["norm.weight"], p.eps)


@attrs.frozen(kw_only=True)
class SandwichParams(DecoderParams):
    """What a Gemma layer reads beyond a Llama layer's: the embedding scale and the attention scale."""

    hidden: int
    scale: float


def scaled_embedding(p: SandwichParams, weights: "Weights", input_ids: "torch.Tensor", position_ids: "torch.Tensor",
                     dtype: "torch.dtype") -> "torch.Tensor":
    """Token embeddings times ``sqrt(hidden)``, the factor rounded to ``dtype`` as transformers does (Gemma)."""
    import torch
    import torch.nn.functional as F

    return F.embedding(input_ids, weights["embed_tokens.weight"]).to(dtype) * torch.tensor(p.hidden ** 0.5).to(dtype)


def gemma_final_norm(p: NormParams, weights: "Weights", x: "torch.Tensor") -> "torch.Tensor":
    """The final ``1 + w`` RMSNorm (Gemma; the logits are then soft-capped by ``final_softcap`` if set)."""
    from lema.domain.nn import norms

    return norms.rms_norm_gemma(x, weights["norm.weight"], p.eps)
