"""Sequence tiling of a decoder layer: everything but attention runs over tiles of the sequence.

At long sequences a layer's working set is dominated by tensors of ``seq x intermediate``
(the MLP's gate, up and their product; the routed experts' activations) and by the fp32
copies LoRA keeps of its inputs. In every family only attention mixes tokens; its norms,
projections, rotary embedding, MLP and residuals treat each token on its own. So a
family's own ``block`` is run on ``tile`` positions of every sequence at a time, with a
context of those positions (:meth:`BlockContext.tile`: their rope tables, their dropout
masks) and an :class:`~lema.domain.nn.attention.AttentionTap` in the block's attention:

* *collect*: the tap writes the tile's rotated ``q, k, v`` into whole-sequence tensors
  and stops the block (nothing after attention runs);
* *attend*: attention over the whole sequence, once, through the family's own attention
  (SDPA's fused kernels, or the eager soft-capped path where the family has one);
* *replay*: the tap returns the tile's rows of that attention output, and the block goes
  on with the output projection, the MLP and the residuals for the tile.

No ``seq x intermediate`` tensor ever exists whole, forward or backward. The backward
(:func:`tiled_backward`) replays the post-attention part of each tile with autograd,
backpropagates attention once, then recollects each tile's ``q, k, v`` with autograd and
backpropagates them. The adapters' gradients are summed over the tiles and handed to
autograd once at the end of the layer, so each adapter's ``.grad`` is accumulated (and
its post-accumulate-grad hooks run: data parallel's gradient buckets) once per layer.

The price is compute: the pre-attention part (norm, q/k/v projections, rope) runs once
more per tile and pass (collect, then again inside the replayed block), and the results
equal the untiled layer's up to fp32 rounding (products over fewer rows, gradients summed
over tiles). With LoRA dropout each tile draws its own masks (seeded by its first
position), identically in the forward and the recompute.

Example:
    >>> import torch
    >>> from lema.domain.model.spec import ModelSpec
    >>> from lema.domain.model.context import make_context
    >>> from lema.domain.model.blocks import decoder_block
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100}
    >>> spec = ModelSpec.from_config(cfg, dtype="F32")
    >>> weights = {t.key: torch.randn(t.shape) * 0.02 for t in spec.units[1].tensors}
    >>> ctx, x = make_context(spec, (2, 40)), torch.randn(2, 40, 64)
    >>> torch.allclose(tiled_forward(spec, weights, None, x, ctx, 0, tile=16),
    ...                decoder_block(spec, weights, None, x, ctx, 0), atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Callable, cast

import torch

from lema.domain.families import registry
from lema.domain.nn.attention import AttentionTap
from lema.domain.nn.context import BlockContext
from lema.domain.nn.linear import Adapters, Weights
from lema.domain.model.spec import ModelSpec
from lema.errors import ConfigError

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def spans(seq: int, tile: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each tile of ``tile`` positions covering ``0 .. seq``.

    Raises:
        ConfigError: a tile smaller than one token.
    """
    if tile < 1:
        raise ConfigError(f"tile: {tile} must be at least 1 token")
    return [(s, min(s + tile, seq)) for s in range(0, seq, tile)]


class _Stop(Exception):
    """Raised by a collecting tap: the rest of the block is not needed."""


class _Collect(AttentionTap):
    """Write each tile's rotated q, k, v into whole-sequence tensors, then stop the block."""

    def __init__(self, seq: int) -> None:
        self.seq, self.start = seq, 0
        self.qkv: list[torch.Tensor] = []
        self.attend_fn: AttendFn | None = None

    def tap(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend_fn: AttendFn) -> torch.Tensor:
        if not self.qkv:
            self.qkv = [t.new_empty(t.shape[0], t.shape[1], self.seq, t.shape[3]) for t in (q, k, v)]
            self.attend_fn = attend_fn  # masks and scale are the whole sequence's in every tile's context
        end = self.start + q.shape[2]
        for whole, part in zip(self.qkv, (q, k, v)):
            whole[:, :, self.start:end] = part
        raise _Stop


class _Replay(AttentionTap):
    """Return precomputed attention rows (the tile's) instead of attending."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def tap(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend_fn: AttendFn) -> torch.Tensor:
        return self.rows


class _Capture(AttentionTap):
    """Keep the tile's rotated q, k, v (with their autograd graph), then stop the block."""

    def __init__(self) -> None:
        self.qkv: tuple[torch.Tensor, ...] = ()

    def tap(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend_fn: AttendFn) -> torch.Tensor:
        self.qkv = (q, k, v)
        raise _Stop


def _block(spec: ModelSpec, weights: Weights, lora: Adapters, x: torch.Tensor, ctx: BlockContext, layer: int,
           tap: AttentionTap) -> torch.Tensor | None:
    try:
        return registry.family(spec.family).block(ctx.params, weights, lora, x, ctx, layer, tap)
    except _Stop:
        return None


def _attention(spec: ModelSpec, weights: Weights, lora: Adapters, x: torch.Tensor, ctx: BlockContext,
               layer: int, tile: int) -> tuple[list[torch.Tensor], AttendFn]:
    """The whole sequence's rotated q, k, v (collected a tile at a time) and the layer's attention."""
    collect = _Collect(x.shape[1])
    for start, end in spans(x.shape[1], tile):
        collect.start = start
        _block(spec, weights, lora, x[:, start:end], ctx.tile(start, end), layer, collect)
    return collect.qkv, cast(AttendFn, collect.attend_fn)  # set by the first tile


def tiled_forward(spec: ModelSpec, weights: Weights, lora: Adapters | None, x: torch.Tensor,
                  ctx: BlockContext, layer: int, tile: int) -> torch.Tensor:
    """:func:`~lema.domain.model.blocks.decoder_block` without autograd, ``tile`` positions at a time.

    Args:
        spec, weights, lora, x, ctx, layer: as for ``decoder_block``.
        tile: positions of every sequence per tile.

    Returns:
        ``(batch, seq, hidden)`` in ``x``'s dtype.
    """
    lora = lora or {}
    with torch.no_grad():
        (q, k, v), attend_fn = _attention(spec, weights, lora, x, ctx, layer, tile)
        attn = attend_fn(q, k, v)
        del q, k, v
        out = torch.empty_like(x)
        for start, end in spans(x.shape[1], tile):
            out[:, start:end] = _block(spec, weights, lora, x[:, start:end], ctx.tile(start, end), layer,
                                       _Replay(attn[:, start:end]))
    return out


class _Sums:
    """The adapters' gradients summed over tiles, handed to autograd once at the end."""

    def __init__(self, lora: Adapters) -> None:
        self.params = [t for pair in lora.values() for t in pair if t.requires_grad]
        self.sums: list[torch.Tensor | None] = [None] * len(self.params)

    def add(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        for i, g in enumerate(grads):
            if g is not None:
                self.sums[i] = g if self.sums[i] is None else self.sums[i].add_(g)  # type: ignore[union-attr]

    def accumulate(self) -> None:
        pairs = [(p, g) for p, g in zip(self.params, self.sums) if g is not None]
        self.sums = []
        if pairs:  # through AccumulateGrad, so .grad adds up and its hooks run, once per layer
            with torch.enable_grad():
                torch.autograd.backward([p.view_as(p) for p, _ in pairs], [g for _, g in pairs])


def tiled_backward(spec: ModelSpec, weights: Weights, lora: Adapters | None, x: torch.Tensor,
                   grad: torch.Tensor, ctx: BlockContext, layer: int, tile: int) -> torch.Tensor:
    """Recompute the layer from its input ``x`` and backpropagate ``grad``, ``tile`` positions at a time.

    The LoRA tensors in ``lora`` (leaves with ``requires_grad``) accumulate their gradients
    in ``.grad``, once, as ``torch.autograd.backward`` on the untiled layer would.

    Args:
        spec, weights, lora, x, ctx, layer: as for ``decoder_block`` (``x`` the layer's input).
        grad: ``dL/d output``, ``(batch, seq, hidden)``; it is overwritten with the result (the
            caller passes a gradient it owns and no longer needs).
        tile: positions of every sequence per tile.

    Returns:
        ``dL/dx``: ``grad`` itself, overwritten.
    """
    lora = lora or {}
    seq = x.shape[1]
    x = x.detach()
    sums = _Sums(lora)
    with torch.no_grad():
        (q, k, v), attend_fn = _attention(spec, weights, lora, x, ctx, layer, tile)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    with torch.enable_grad():
        attn = attend_fn(q, k, v)
    grad_attn = torch.empty_like(attn)
    held = attn.detach()
    for start, end in spans(seq, tile):
        x_tile = x[:, start:end].detach().requires_grad_(True)
        a_tile = held[:, start:end].detach().requires_grad_(True)
        with torch.enable_grad():
            out = _block(spec, weights, lora, x_tile, ctx.tile(start, end), layer, _Replay(a_tile))
            grads = torch.autograd.grad(out, [x_tile, a_tile, *sums.params], grad[:, start:end], allow_unused=True)
        del out
        # The tile's incoming gradient has been used: its rows now carry dL/dx through the residual path.
        grad[:, start:end] = grads[0]
        grad_attn[:, start:end] = grads[1]
        sums.add(grads[2:])
        del x_tile, a_tile, grads
    del held
    torch.autograd.backward(attn, grad_attn)
    del attn, grad_attn
    qkv_grads = [q.grad, k.grad, v.grad]
    del q, k, v
    for start, end in spans(seq, tile):
        x_tile = x[:, start:end].detach().requires_grad_(True)
        capture = _Capture()
        with torch.enable_grad():
            _block(spec, weights, lora, x_tile, ctx.tile(start, end), layer, capture)
            tile_grads = torch.autograd.grad(capture.qkv, [x_tile, *sums.params],
                                             [g[:, :, start:end] for g in qkv_grads], allow_unused=True)
        del capture
        grad[:, start:end] += tile_grads[0]
        sums.add(tile_grads[1:])
        del x_tile, tile_grads
    del qkv_grads
    sums.accumulate()
    return grad
