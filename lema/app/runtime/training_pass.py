"""The data path of one training step (DESIGN.md §2), as callbacks the engine calls.

The engine walks the layer schedule and, for every compute step, hands over the unit's
weights already on the device. This module decides what a compute *does*:

* forward of decoder layer i: remember its input ``x_i`` (gradient checkpointing at
  layer granularity), then ``x_{i+1} = block(x_i)`` with no autograd graph;
* forward of the head (the turn): chunked cross-entropy with autograd on ``x_L`` only,
  backward to get ``dL/dx_L``;
* backward of decoder layer i: recompute ``block(x_i)`` with autograd from the saved input,
  backpropagate the incoming gradient (LoRA gradients accumulate in their ``.grad``), and
  pass ``dL/dx_i`` on.

With ``tile_tokens`` (chosen by the planner for long sequences) the checkpointed forward
and the recompute + backward run the layer over sequence tiles
(:mod:`lema.domain.model.tiling`). With activation offload the engine moves the saved
inputs to host memory and back through :meth:`TrainingPass.take_input` and
:meth:`TrainingPass.give_input` (the pass is the engine's ``InputStore``).

With ``gradient_checkpointing=False`` (or for the units in ``kept_units``: the plan's kept
activations) the forward keeps the layer's autograd graph and the backward skips the recompute. The graph would pin the layer's weight slot, so saved base
weights are swapped for a reference and looked up again in the slot the engine refills
for the backward step (``torch.autograd.graph.saved_tensors_hooks``).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from lema.domain.model import blocks, heads, tiling
from lema.domain.nn.context import BlockContext
from lema.domain.model.lora import LoraState
from lema.domain.model.spec import ModelSpec
from lema.domain.objectives.next_token import NEXT_TOKEN
from lema.domain.objectives.objective import Objective
from lema.domain.schedule.layer_schedule import Phase
from lema.errors import ConfigError


class TrainingPass:
    """State of one training micro-step while the engine walks the schedule.

    Args:
        spec: the model.
        lora: the adapters on the device.
        ctx: the batch context (masks, rope, dropout seed) on the device.
        x0: the embedding output on the device, ``(batch, seq, hidden)``.
        targets: shifted targets ``(batch, seq)`` on the device (-100 ignored).
        loss_scale: the loss is multiplied by this before backward (1 / accumulation steps,
            times a float16 run's loss scale: :mod:`lema.app.training.loss_scaling`).
        token_count: divide the summed loss by this many target tokens (default: the
            batch's own; data parallel passes the count of the whole batch over all ranks,
            as a function called where the divisor is first needed, at the head, so that
            the ranks' count travels while the forward runs).
        n_tokens: this batch's own count of targets, counted on the host before the upload
            (None: the objective counts them, reading the device).
        checkpointing: recompute each layer in backward (True) or keep its graph (False).
        chunk_tokens: tokens per cross-entropy chunk.
        keep_logits: also keep the full float32 logits of the last layer's output (the
            ones the loss is computed from) in :attr:`logits`.
        objective: what the step minimises, computed at the head (:mod:`lema.domain.objectives`;
            default next-token cross-entropy).
        tile_tokens: positions per sequence tile of each layer (0, or the sequence length or
            more: untiled); needs checkpointing.
        kept_units: with checkpointing, the decoder units that keep their autograd graph from
            the forward instead of recomputing (the plan's kept activations); not with tiles.
    """

    def __init__(self, spec: ModelSpec, lora: LoraState, ctx: BlockContext, x0: torch.Tensor,
                 targets: torch.Tensor, *, loss_scale: float = 1.0, checkpointing: bool = True,
                 chunk_tokens: int = heads.DEFAULT_CHUNK_TOKENS, keep_logits: bool = False,
                 token_count: int | Callable[[], int] | None = None, tile_tokens: int = 0,
                 objective: Objective = NEXT_TOKEN,
                 kept_units: frozenset[int] = frozenset(), n_tokens: int | None = None) -> None:
        tiled = 0 < tile_tokens < x0.shape[1]
        if tiled and (not checkpointing or kept_units):
            raise ConfigError("sequence tiling recomputes each layer: it needs gradient_checkpointing=True "
                              "and no kept activations")
        self.kept_units = frozenset(kept_units)
        self.spec, self.lora, self.ctx, self.targets = spec, lora, ctx, targets
        self.token_count = token_count
        self._batch_tokens = n_tokens
        self.tile = tile_tokens if tiled else 0
        self.loss_scale, self.checkpointing = loss_scale, checkpointing
        self.chunk_tokens = chunk_tokens
        self.objective = objective
        self.keep_logits = keep_logits
        self.logits: torch.Tensor | None = None
        self.x = x0
        self.saved: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.grad: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | float = 0.0  # read by the host only after the pass (loss_sum)
        self.n_tokens: int = 0
        self._weights: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, phase: Phase, unit: int, weights: Mapping[str, torch.Tensor]) -> None:
        if unit == self.spec.n_layers + 1:
            self._head(weights)
        elif phase is Phase.FORWARD:
            self._forward(unit, weights)
        else:
            self._backward(unit, weights)

    def take_input(self, unit: int) -> torch.Tensor:
        """Hand ``unit``'s checkpointed input to the engine (activation offload)."""
        if not self._recomputes(unit):
            raise ConfigError("activation offload moves checkpointed inputs: it needs gradient_checkpointing=True "
                              "and no kept activations")
        return self.saved.pop(unit)

    def give_input(self, unit: int, x: torch.Tensor) -> None:
        """Take ``unit``'s checkpointed input back from the engine, before its backward."""
        self.saved[unit] = x

    def _recomputes(self, unit: int) -> bool:
        """Whether ``unit``'s backward recomputes it from its saved input."""
        return self.checkpointing and unit not in self.kept_units

    def _forward(self, unit: int, weights: Mapping[str, torch.Tensor]) -> None:
        layer = unit - 1
        x_in = self.x
        if self._recomputes(unit):
            self.saved[unit] = x_in
            with torch.no_grad():
                if self.tile:
                    self.x = tiling.tiled_forward(self.spec, weights, self.lora.layer(layer), x_in, self.ctx, layer,
                                                  self.tile)
                else:
                    self.x = blocks.decoder_block(self.spec, weights, self.lora.layer(layer), x_in, self.ctx, layer)
            return
        x_in = x_in.detach().requires_grad_(True)
        self.saved[unit] = x_in
        refs = _WeightRefs(unit, weights)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(refs.pack, self._unpack):
            out = blocks.decoder_block(self.spec, weights, self.lora.layer(layer), x_in, self.ctx, layer)
        self.outputs[unit] = out
        self.x = out.detach()

    @property
    def loss_sum(self) -> float:
        """The pass's summed token loss, read from the device once, after the pass (reading it
        at the turn would make the host wait for the whole forward before issuing the backward)."""
        if isinstance(self._loss_sum, torch.Tensor):
            self._loss_sum = float(self._loss_sum)
        return self._loss_sum

    def _unpack(self, packed: object) -> torch.Tensor:
        if isinstance(packed, tuple) and len(packed) == 3 and packed[0] is _WeightRefs.TAG:
            _, unit, view = packed
            return _rebuild(self._weights[unit], view)
        return packed  # type: ignore[return-value]

    def _head(self, weights: Mapping[str, torch.Tensor]) -> None:
        if self.keep_logits:
            with torch.no_grad():
                self.logits = heads.head_logits(self.spec, weights, self.x, self.ctx.matmul_dtype)
        x_last = self.x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss_sum, n_tokens = self.objective.loss(self.spec, weights, x_last, self.targets, self.chunk_tokens,
                                                     self.ctx.matmul_dtype, n_tokens=self._batch_tokens)
            self.n_tokens = n_tokens
            self._loss_sum = loss_sum.detach()  # no host read here: the backward is issued without waiting
            count = self.token_count
            denominator = n_tokens if count is None else count() if callable(count) else count
            (loss_sum * (self.loss_scale / max(denominator, 1))).backward()
        self.grad = x_last.grad
        self.x = None  # type: ignore[assignment]

    def _backward(self, unit: int, weights: Mapping[str, torch.Tensor]) -> None:
        layer = unit - 1
        x_in = self.saved.pop(unit)
        if self.tile:
            grad, self.grad = self.grad, None
            self.grad = tiling.tiled_backward(self.spec, weights, self.lora.layer(layer), x_in, grad, self.ctx,
                                              layer, self.tile)
            return
        if self._recomputes(unit):
            x_in = x_in.detach().requires_grad_(True)
            with torch.enable_grad():
                out = blocks.decoder_block(self.spec, weights, self.lora.layer(layer), x_in, self.ctx, layer)
                torch.autograd.backward(out, self.grad)
        else:
            self._weights[unit] = dict(weights)
            out = self.outputs.pop(unit)
            torch.autograd.backward(out, self.grad)
            del self._weights[unit]
        self.grad = x_in.grad
        del out, x_in


class _WeightRefs:
    """Pack hook: store views of base weights as (unit, key, view) instead of the slot's storage.

    Any saved tensor whose data lies inside one of the unit's weights (the weight itself, a
    transpose, a reshape) is recorded relative to that weight and rebuilt with
    ``as_strided`` on the copy the engine provides for the backward step, so the graph never
    holds a slot that the prefetcher overwrites.
    """

    TAG = object()

    def __init__(self, unit: int, weights: Mapping[str, torch.Tensor]) -> None:
        self.unit = unit
        self.ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), k, t)
                       for k, t in weights.items()]

    def pack(self, tensor: torch.Tensor) -> object:
        if tensor.requires_grad:
            return tensor
        ptr = tensor.data_ptr()
        for begin, end, key, base in self.ranges:
            if begin <= ptr < end and tensor.dtype == base.dtype:
                delta = (ptr - begin) // tensor.element_size()
                return (self.TAG, self.unit, (key, delta, tuple(tensor.shape), tensor.stride()))
        return tensor


def _rebuild(weights: Mapping[str, torch.Tensor], view: tuple) -> torch.Tensor:
    key, delta, shape, stride = view
    base = weights[key]
    return torch.as_strided(base, shape, stride, base.storage_offset() + delta)
