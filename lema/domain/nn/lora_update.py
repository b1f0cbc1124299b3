"""PEFT's LoRA update ``out + lora_B(lora_A(x)) * scaling``, with its backward written out.

PEFT (and :func:`lema.domain.nn.linear.linear` before this module) computes the update
through autograd: ``x`` is cast to the adapter's dtype (fp32), the two products run there,
the fp32 sum with the base output is cast back. Its backward then casts the incoming bf16
gradient to fp32, casts it back to bf16 for the base output (a round trip that changes
nothing), and casts the input gradient down: six passes over ``(tokens, width)`` tensors
and a temporary fp32 sum per module, which on a 2-core CPU cost as much as the two skinny
products (measured on the 100m preset: a LoRA'd 768x768 projection took 1.76x its base
product's time, forward and backward).

:func:`lora_update` computes the same values with the same products in the same order: the
sum is written straight into a tensor of the base output's dtype (an add with ``out=``
computes in the promoted dtype and rounds once, as ``(out + delta).to(out.dtype)`` does),
the base output's gradient
is the incoming one as it is, and the casts left are ``x`` up, the gradient up, the input
gradient down. The results are bit-identical to the autograd formulation (tested), and
several modules that read the same input (q, k and v; gate and up) share one cast of it and
one ``A`` product with their ``A`` matrices stacked (and one of each in the backward).

Example:
    >>> import torch
    >>> x = torch.ones(2, 3)
    >>> out = x @ torch.eye(3)
    >>> (y,) = lora_update(x, [out], torch.ones(1, 3), [torch.ones(3, 1)], scaling=0.5)
    >>> y.tolist()
    [[2.5, 2.5, 2.5], [2.5, 2.5, 2.5]]
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["lora_update", "power_of_two"]


def power_of_two(x: float) -> bool:
    """``x`` is a positive power of two (scaling by it is exact in any binary float)."""
    return x > 0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _LoraUpdate(torch.autograd.Function):
    """``outs[i] += F.linear(part_i, B_i) * scaling`` with ``parts = split(F.linear(x, A))``
    (``A`` the modules' stacked ``A`` matrices); see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, scaling: float, ranks: tuple[int, ...],
                *outs_and_bs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(ranks)
        outs, bs = outs_and_bs[:n], outs_and_bs[n:]
        exact = power_of_two(scaling)
        xa = x.to(a.dtype)
        first = F.linear(xa, a)
        if exact:
            # Scaling the rank-r product instead of the output is the same to the bit (a power
            # of two scales every product and partial sum exactly) and costs r/out of the multiply.
            first = first * scaling
        parts = first.split(list(ranks), dim=-1)
        results = []
        for out, part, b in zip(outs, parts, bs):
            delta = F.linear(part, b)
            # out + delta in the promoted dtype, rounded once into out's dtype: what
            # (out + delta).to(out.dtype) gives, without the promoted temporary
            results.append(torch.add(out, delta if exact else delta * scaling, out=torch.empty_like(out)))
        ctx.scaling, ctx.exact, ctx.ranks, ctx.x_dtype = scaling, exact, ranks, x.dtype
        ctx.save_for_backward(xa, a, *parts, *bs)
        return tuple(results)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        n = len(ctx.ranks)
        xa, a, *rest = ctx.saved_tensors
        parts, bs = rest[:n], rest[n:]
        scaling, exact = ctx.scaling, ctx.exact
        grad_bs: list[torch.Tensor | None] = []
        grad_parts: list[torch.Tensor] = []
        for grad, part, b in zip(grads, parts, bs):
            g = grad.to(b.dtype)
            if not exact:
                g = g * scaling
            grad_bs.append(_rows(g).t().mm(_rows(part)) if ctx.needs_input_grad[4 + n + len(grad_bs)] else None)
            grad_parts.append(g.matmul(b))
        grad_first = grad_parts[0] if n == 1 else torch.cat(grad_parts, dim=-1)
        if exact:
            grad_first = grad_first * scaling
        grad_a = _rows(grad_first).t().mm(_rows(xa)) if ctx.needs_input_grad[1] else None
        grad_x = grad_first.matmul(a).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return (grad_x, grad_a, None, None, *grads, *grad_bs)


def lora_update(x: torch.Tensor, outs: Sequence[torch.Tensor], a: torch.Tensor, bs: Sequence[torch.Tensor],
                scaling: float, ranks: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
    """Each module's base output plus its LoRA update.

    Args:
        x: the modules' common input ``(..., in)``.
        outs: each module's base output ``(..., out_i)``.
        a: the modules' ``A`` matrices stacked, ``[sum(ranks), in]``.
        bs: each module's ``B``, ``[out_i, rank_i]``.
        scaling: the adapters' scale.
        ranks: each module's rank (default: ``a``'s rows split evenly).

    Returns:
        ``out_i + B_i(A_i(x)) * scaling`` for each module, rounded to ``out_i``'s dtype.
    """
    if ranks is None:
        ranks = [a.shape[0] // len(bs)] * len(bs)
    return _LoraUpdate.apply(x, a, scaling, tuple(ranks), *outs, *bs)
