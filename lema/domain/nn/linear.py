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

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from lema.domain.nn.lora_update import lora_update, power_of_two
from lema.domain.nn.matmul import frozen_linear, split_linear

if TYPE_CHECKING:
    from lema.domain.nn.context import BlockContext

Weights = Mapping[str, torch.Tensor]
Adapters = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


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
    """PEFT's ``lora_B(lora_A(dropout(x))) * scaling`` with ``x`` cast to the adapter dtype,
    for ``ctx.lora_dropout > 0`` (without dropout :func:`lema.domain.nn.lora_update.lora_update`
    computes the update)."""
    a, b = adapter
    h = x.to(a.dtype)
    # One seeded generator per (layer, module, first token): a recomputed layer, or a tile
    # of one (lema.domain.model.tiling), redraws the same mask.
    seed = (ctx.dropout_seed + 7919 * site + 104729 * ctx.token_offset) % (2**63 - 1)
    gen = torch.Generator(device=h.device).manual_seed(seed)
    keep = torch.empty_like(h).bernoulli_(1.0 - ctx.lora_dropout, generator=gen)
    h = h * keep / (1.0 - ctx.lora_dropout)
    scaling = ctx.lora_scaling
    if power_of_two(scaling):
        # as lora_update does: the same to the bit, r/out of the multiply
        return F.linear(F.linear(h, a) * scaling, b)
    return F.linear(F.linear(h, a), b) * scaling


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
    if ctx.lora_dropout > 0.0:
        return (out + _lora_delta(x, adapter, ctx, site)).to(out.dtype)
    a, b = adapter
    return lora_update(x, [out], a, [b], ctx.lora_scaling)[0]


class Projector:
    """``proj(h, key)``: the module ``key`` of one layer (weight, optional bias, its adapter);
    ``proj.many(h, keys)``: several modules that read the same input (q, k and v; gate and up).

    ``many`` computes the adapters' ``A`` products of its modules as one product with their
    ``A`` matrices stacked, on one fp32 copy of ``h`` (:func:`lema.domain.nn.lora_update.lora_update`):
    PEFT's ``lora_A(x)`` of each module, column block by column block, in one skinny matmul
    instead of several, and likewise in the backward. With dropout each module draws its own
    mask on its own copy of ``h``, so ``many`` runs the modules one by one.
    """

    def __init__(self, weights: Weights, lora: Adapters | None, ctx: "BlockContext", layer: int,
                 module_keys: Sequence[str], *, conv1d: bool = False) -> None:
        self.weights, self.lora, self.ctx, self.conv1d = weights, lora or {}, ctx, conv1d
        self.sites = {key: layer * 16 + j for j, key in enumerate(module_keys)}
        self.backward = weights.backward_weights if isinstance(weights, SplitWeights) else {}

    def __call__(self, h: torch.Tensor, key: str) -> torch.Tensor:
        return self._linear(h, key, self.lora.get(key))

    def _linear(self, h: torch.Tensor, key: str, adapter: tuple | None) -> torch.Tensor:
        w = self.weights
        return linear(h, w[key + ".weight"], w.get(key + ".bias"), adapter, self.ctx, conv1d=self.conv1d,
                      site=self.sites.get(key, 0), backward_weight=self.backward.get(key + ".weight"))

    def many(self, h: torch.Tensor, keys: Sequence[str]) -> list[torch.Tensor]:
        """``[proj(h, key) for key in keys]``, the adapters' ``A`` products stacked (see the class)."""
        adapters = [self.lora[key] for key in keys if key in self.lora]
        if self.ctx.lora_dropout > 0.0 or len(adapters) < len(keys) or len({a.dtype for a, _ in adapters}) > 1:
            return [self(h, key) for key in keys]
        outs = [self._linear(h, key, None) for key in keys]
        a_stacked = torch.cat([a for a, _ in adapters])
        return list(lora_update(h, outs, a_stacked, [b for _, b in adapters], self.ctx.lora_scaling,
                                [a.shape[0] for a, _ in adapters]))


def projector(weights: Weights, lora: Adapters | None, ctx: "BlockContext", layer: int,
              module_keys: Sequence[str], *, conv1d: bool = False) -> Projector:
    """The :class:`Projector` of one layer's weights and adapters.

    ``module_keys`` is the family's adaptable modules in execution order; a module's index
    there and the layer number make its dropout seed, unique in the model.
    """
    return Projector(weights, lora, ctx, layer, module_keys, conv1d=conv1d)
