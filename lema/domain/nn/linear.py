"""A frozen linear map plus an optional LoRA update, as PEFT's ``lora.Linear`` computes it.

Every family's projections go through :func:`linear` (or a :func:`projector` over one
layer's weights and adapters), so the LoRA math, its dropout and the wide products of
:mod:`lema.domain.nn.matmul` live in one place.

Example:
    >>> import torch
    >>> from lema.domain.nn.context import BlockContext
    >>> ctx = BlockContext(dtype=torch.float32, position_ids=torch.zeros(1, 1, dtype=torch.long), ropes={},
    ...                    masks={}, params=None)
    >>> linear(torch.ones(1, 3), torch.eye(3), None, (torch.ones(1, 3), torch.ones(3, 1)), ctx).tolist()
    [[4.0, 4.0, 4.0]]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from lema.domain.nn.matmul import frozen_linear, split_linear

if TYPE_CHECKING:
    from lema.domain.nn.context import BlockContext

Weights = Mapping[str, torch.Tensor]
Adapters = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
Projector = Callable[[torch.Tensor, str], torch.Tensor]


class SplitWeights(dict[str, torch.Tensor]):
    """A unit's weights by key, some of whose backward products use another rounding.

    ``backward_weights[key]()`` makes the weight the backward of ``key``'s product
    multiplies by (see :func:`lema.domain.nn.matmul.split_linear`); keys absent from it
    use the forward's. Made by the dequantizer of a quantized base; read by :func:`projector`.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor],
                 backward_weights: Mapping[str, Callable[[], torch.Tensor]]) -> None:
        super().__init__(weights)
        self.backward_weights = dict(backward_weights)


def cast_weights(weights: Weights, dtype: torch.dtype) -> Weights:
    """A unit's weights with every floating tensor in ``dtype`` (the same mapping when nothing
    needs a cast; a :class:`SplitWeights` stays one, its backward weights kept)."""
    if all(not t.is_floating_point() or t.dtype == dtype for t in weights.values()):
        return weights
    cast = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in weights.items()}
    return SplitWeights(cast, weights.backward_weights) if isinstance(weights, SplitWeights) else cast


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _lora_delta(x: torch.Tensor, adapter: tuple[torch.Tensor, torch.Tensor], ctx: "BlockContext",
                site: int) -> torch.Tensor:
    """PEFT's ``lora_B(lora_A(dropout(x))) * scaling`` with ``x`` cast to the adapter dtype."""
    a, b = adapter
    h = x.to(a.dtype)
    if ctx.lora_dropout > 0.0:
        # One seeded generator per (layer, module, first token): a recomputed layer, or a tile
        # of one (lema.domain.model.tiling), redraws the same mask.
        seed = (ctx.dropout_seed + 7919 * site + 104729 * ctx.token_offset) % (2**63 - 1)
        gen = torch.Generator(device=h.device).manual_seed(seed)
        keep = torch.empty_like(h).bernoulli_(1.0 - ctx.lora_dropout, generator=gen)
        h = h * keep / (1.0 - ctx.lora_dropout)
    scaling = ctx.lora_scaling
    if _power_of_two(scaling):
        # Scaling the rank-r product instead of the output is the same to the bit (a power of
        # two scales every product and partial sum exactly) and costs r/out of the multiply.
        return F.linear(F.linear(h, a) * scaling, b)
    return F.linear(F.linear(h, a), b) * scaling


def _power_of_two(x: float) -> bool:
    return x > 0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapter: tuple | None,
           ctx: "BlockContext", *, conv1d: bool = False, site: int = 0,
           backward_weight: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """A frozen linear map plus an optional LoRA update.

    Args:
        x: ``(..., in)`` activations in the compute dtype.
        weight: ``[out, in]`` (``nn.Linear``) or ``[in, out]`` when ``conv1d`` (GPT-2).
        bias: ``[out]`` or None.
        adapter: ``(A, B)`` or None.
        ctx: the batch context (scaling, dropout, the products' dtype).
        conv1d: the weight has GPT-2's Conv1D ``[in, out]`` layout.
        site: a number unique to this module in the model, seeding its dropout mask.
        backward_weight: makes the weight the backward multiplies by, when it is another
            rounding than ``weight`` (:class:`SplitWeights`); None: ``weight``.

    Returns:
        ``(..., out)`` activations in ``x``'s dtype.
    """
    if backward_weight is not None and torch.is_grad_enabled() and x.requires_grad:
        wide = ctx.matmul_dtype if ctx.matmul_dtype is not None and ctx.matmul_dtype != x.dtype else None
        out = split_linear(x, weight.to(x.dtype), _cast(bias, x.dtype), backward_weight, conv1d=conv1d,
                           matmul_dtype=wide)
    elif ctx.matmul_dtype is not None and ctx.matmul_dtype != x.dtype:
        out = frozen_linear(x, weight.to(x.dtype), _cast(bias, x.dtype), conv1d=conv1d,
                            matmul_dtype=ctx.matmul_dtype)
    else:
        w, b = weight.to(x.dtype), _cast(bias, x.dtype)
        if conv1d:
            flat = x.reshape(-1, x.shape[-1])
            out = (torch.addmm(b, flat, w) if b is not None else flat @ w).view(*x.shape[:-1], w.shape[-1])
        else:
            out = F.linear(x, w, b)
    if adapter is None:
        return out
    return (out + _lora_delta(x, adapter, ctx, site)).to(out.dtype)


def projector(weights: Weights, lora: Adapters | None, ctx: "BlockContext", layer: int,
              module_keys: Sequence[str], *, conv1d: bool = False) -> Projector:
    """``proj(h, key)``: the module ``key`` of one layer (weight, optional bias, its adapter).

    ``module_keys`` is the family's adaptable modules in execution order; a module's index
    there and the layer number make its dropout seed, unique in the model.
    """
    lora = lora or {}
    sites = {key: layer * 16 + j for j, key in enumerate(module_keys)}
    backward = weights.backward_weights if isinstance(weights, SplitWeights) else {}

    def proj(h: torch.Tensor, key: str) -> torch.Tensor:
        return linear(h, weights[key + ".weight"], weights.get(key + ".bias"), lora.get(key), ctx,
                      conv1d=conv1d, site=sites.get(key, 0), backward_weight=backward.get(key + ".weight"))

    return proj
