"""Products with frozen weights, optionally computed in a wider dtype.

On CPUs without native bf16/fp16 arithmetic (AVX2 machines), PyTorch's bf16 matmul is
several times slower than fp32, and the orientation a linear layer's backward needs
(``grad_out @ W``) is up to 100x slower (measured: 0.5 s vs 4.7 ms for a 128x2048 by
2048x768 product). The device chooses a ``matmul_dtype`` (see
``CpuDevice.matmul_dtype``); when it differs from the activations' dtype, the products
below upcast their operands, multiply, and cast the result back, so the model computes in
its own dtype everywhere else.

:class:`_FrozenLinear` also saves only the weight for backward (never the input: the
weight is frozen, so no weight gradient is needed) and recomputes the upcast weight there,
so no wide copy outlives the product.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


def _wide(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, conv1d: bool = False,
            matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ W.T + b`` (``x @ W + b`` for GPT-2's Conv1D layout) in ``x``'s dtype, no autograd."""
    dtype = x.dtype if matmul_dtype is None else matmul_dtype
    xw, w, b = x.to(dtype), weight.to(dtype), _wide(bias, dtype)
    if conv1d:
        flat = xw.reshape(-1, xw.shape[-1])
        out = (torch.addmm(b, flat, w) if b is not None else flat @ w).view(*x.shape[:-1], w.shape[-1])
    else:
        out = F.linear(xw, w, b)
    return out.to(x.dtype)


def backproject(grad: torch.Tensor, weight: torch.Tensor, *, conv1d: bool = False,
                matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``grad @ W`` (``grad @ W.T`` for Conv1D): the gradient of :func:`project` w.r.t. ``x``."""
    dtype = grad.dtype if matmul_dtype is None else matmul_dtype
    g, w = grad.to(dtype), weight.to(dtype)
    out = g @ (w.t() if conv1d else w)
    return out.to(grad.dtype)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool,
                matmul_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.conv1d, ctx.matmul_dtype = conv1d, matmul_dtype
        return project(x, weight, bias, conv1d=conv1d, matmul_dtype=matmul_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (weight,) = ctx.saved_tensors
        grad_x = backproject(grad, weight, conv1d=ctx.conv1d, matmul_dtype=ctx.matmul_dtype)
        return grad_x, None, None, None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  conv1d: bool = False, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A linear map with a frozen weight (and bias), differentiable with respect to ``x`` only.

    Args:
        x: ``(..., in)`` activations.
        weight: ``[out, in]``, or ``[in, out]`` with ``conv1d``.
        bias: ``[out]`` or None.
        conv1d: GPT-2's Conv1D layout.
        matmul_dtype: dtype the product is computed in (None: ``x``'s).

    Returns:
        ``(..., out)`` in ``x``'s dtype.
    """
    if matmul_dtype is None or matmul_dtype == x.dtype:
        raise ValueError("frozen_linear is for a matmul_dtype wider than the activations'")
    return _FrozenLinear.apply(x, weight, bias, conv1d, matmul_dtype)


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                backward_weight: Callable[[], torch.Tensor], conv1d: bool,
                matmul_dtype: torch.dtype | None) -> torch.Tensor:
        ctx.backward_weight, ctx.conv1d, ctx.matmul_dtype = backward_weight, conv1d, matmul_dtype
        return project(x, weight, bias, conv1d=conv1d, matmul_dtype=matmul_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        weight = ctx.backward_weight().to(grad.dtype)
        grad_x = backproject(grad, weight, conv1d=ctx.conv1d, matmul_dtype=ctx.matmul_dtype)
        del weight
        return grad_x, None, None, None, None, None


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 backward_weight: Callable[[], torch.Tensor], *, conv1d: bool = False,
                 matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A frozen linear map whose backward multiplies by another rounding of the weight.

    bitsandbytes computes a 4-bit layer's forward with the weight dequantized into the
    activations' dtype and its backward with the weight dequantized into the dtype it was
    quantized from, then cast (:func:`lema.adapters.weights.bnb.dequantize`); where the two
    differ, this reproduces both. ``backward_weight()`` makes the backward's weight when the
    backward runs (one weight alive at a time, freed after its product); nothing but the
    callable is saved for backward.

    Args:
        x: ``(..., in)`` activations.
        weight: the forward's weight, ``[out, in]`` (``[in, out]`` with ``conv1d``).
        bias: ``[out]`` or None (frozen).
        backward_weight: makes the backward's weight, same shape.
        conv1d: GPT-2's Conv1D layout.
        matmul_dtype: dtype the products are computed in (None: ``x``'s).
    """
    return _SplitLinear.apply(x, weight, bias, backward_weight, conv1d, matmul_dtype)
