"""Normalisations and activations as transformers computes them, casts included (pure torch).

Three RMSNorms differ only in where the scale is applied: Llama's multiplies in the
activations' dtype after casting back, OLMo 2's multiplies in fp32 and casts last, and
Gemma's scales by ``1 + w`` (weights stored zero-centred) in fp32. Equal in fp32; the
casts matter in bf16.

Example:
    >>> x = torch.ones(2, 4)
    >>> rms_norm(x, torch.full((4,), 2.0), 0.0)[0].tolist()
    [2.0, 2.0, 2.0, 2.0]
    >>> rms_norm_gemma(x, torch.zeros(4), 0.0)[0].tolist()
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lema.errors import ModelFormatError


def _normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm (``LlamaRMSNorm``; also Mistral, Qwen, Phi-3, Mixtral): normalise in
    fp32, cast back, then scale."""
    return weight.to(x.dtype) * _normalised(x, eps).to(x.dtype)


def rms_norm_fp32_scale(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """OLMo 2's RMSNorm: scale while still in fp32, cast at the end."""
    return (weight.to(x.dtype) * _normalised(x, eps)).to(x.dtype)


def rms_norm_gemma(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: everything in fp32, scale ``1 + w``, cast at the end."""
    return (_normalised(x, eps) * (1.0 + weight.float())).type_as(x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm with the weights cast to ``x``'s dtype (GPT-2)."""
    return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation, written out (F.gelu(approximate="tanh") differs by ~1 ulp).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu, "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu_fast": _gelu_new,
}
ACTIVATIONS = tuple(sorted(_ACTIVATIONS))


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function a config names (``hidden_act`` / ``hidden_activation`` /
    ``activation_function``).

    Raises:
        ModelFormatError: for an activation LEMA does not implement.
    """
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelFormatError(f"config.json: activation {name!r} is not supported; "
                               f"LEMA implements {', '.join(ACTIVATIONS)}") from None
