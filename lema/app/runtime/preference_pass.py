"""The data path of one preference step: the policy pass plus the reference forward in the same pass.

A :class:`PreferencePass` is a :class:`~lema.app.runtime.training_pass.TrainingPass` whose
forward of decoder layer ``i`` also runs the *reference* model's layer ``i`` on the same
fetched weights: the base with the frozen adapter the run started from (or none), no
autograd, no LoRA dropout. The reference hidden states move along beside the policy's
(one extra ``(rows, seq, hidden)`` activation, never checkpointed), so the reference costs
compute but no link bytes: the layer's weights come over the link once for both.

At the head the reference log-probs are computed first (no grad), then the policy's, and the
objective (:mod:`lema.domain.objectives.preference`) gives the loss, which is backpropagated
into the layers as for SFT. :attr:`metrics` holds the step's logged values (TRL's names).

:func:`reference_logps_two_pass` computes the same reference log-probs in a separate
forward pass through the engine (the check for the same-pass reference; it moves the
weights a second time).
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs
import torch

from lema.app.runtime.training_pass import TrainingPass
from lema.domain.model import blocks, heads, tiling
from lema.domain.model.lora import LoraState
from lema.domain.objectives.preference import PreferenceObjective, RowLogps, row_logps, token_logps
from lema.domain.schedule.layer_schedule import Phase


class PreferencePass(TrainingPass):
    """A :class:`TrainingPass` for a preference objective (see the module docstring).

    Args:
        objective: the preference objective.
        answer_mask: ``(rows, seq)`` 1 where the (shifted) target is an answer token.
        full_mask: ``(rows, seq)`` 1 where the target is any non-padding token (ORPO), or None.
        reference: the frozen starting adapter, or None (the base model is the reference).
        desirable: KTO's labels of the completion rows, or None.
        precomputed: reference row log-probs computed elsewhere (a two-pass reference); the
            same-pass reference forward is then skipped.
        others: as :class:`TrainingPass` (``targets`` are the full targets: every
            non-padding token; the loss counts what the objective says).
    """

    def __init__(self, *args: Any, objective: PreferenceObjective, answer_mask: torch.Tensor,
                 full_mask: torch.Tensor | None = None, reference: LoraState | None = None,
                 desirable: torch.Tensor | None = None, precomputed: RowLogps | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.preference = objective
        self.answer_mask, self.full_mask = answer_mask, full_mask
        self.reference, self.desirable = reference, desirable
        self.precomputed = precomputed
        self.same_pass = objective.needs_reference and precomputed is None
        self.x_ref = self.x if self.same_pass else None
        self.ref_ctx = attrs.evolve(self.ctx, lora_dropout=0.0)
        self.metrics: dict[str, float] = {}
        self.reference_logps: RowLogps | None = precomputed

    def _forward(self, unit: int, weights: Mapping[str, torch.Tensor]) -> None:
        if self.same_pass:
            self.x_ref = reference_layer(self, unit, weights, self.x_ref)
        super()._forward(unit, weights)

    def _head(self, weights: Mapping[str, torch.Tensor]) -> None:
        if self.same_pass:
            with torch.no_grad():
                ref = token_logps(self.spec, weights, self.x_ref, self.targets, self.chunk_tokens,
                                  self.ctx.matmul_dtype)
            self.reference_logps = row_logps(ref, self.answer_mask)
            self.x_ref = None
        x_last = self.x.detach().requires_grad_(True)
        with torch.enable_grad():
            per_token = token_logps(self.spec, weights, x_last, self.targets, self.chunk_tokens,
                                    self.ctx.matmul_dtype)
            policy = row_logps(per_token, self.answer_mask, self.full_mask)
            out = self.preference.compute(policy, self.reference_logps, self.desirable)
            self.metrics = out.metrics
            self.n_tokens = 1
            self._loss_sum = out.metrics["loss"]
            (out.loss * self.loss_scale).backward()
        self.grad = x_last.grad
        self.x = None  # type: ignore[assignment]


def reference_layer(step: TrainingPass | Any, unit: int, weights: Mapping[str, torch.Tensor],
                    x: torch.Tensor) -> torch.Tensor:
    """The reference model's decoder layer ``unit - 1`` on ``x``, no autograd (frozen adapter or none)."""
    layer = unit - 1
    adapters = None if step.reference is None else step.reference.layer(layer)
    with torch.no_grad():
        if step.tile:
            return tiling.tiled_forward(step.spec, weights, adapters, x, step.ref_ctx, layer, step.tile)
        return blocks.decoder_block(step.spec, weights, adapters, x, step.ref_ctx, layer)


class _ReferenceForward:
    """The compute callback of a forward-only engine pass for the reference log-probs."""

    def __init__(self, spec: Any, ctx: Any, x0: torch.Tensor, targets: torch.Tensor, answer_mask: torch.Tensor,
                 reference: LoraState | None, chunk_tokens: int, tile: int) -> None:
        self.spec, self.x, self.targets, self.answer_mask = spec, x0, targets, answer_mask
        self.reference, self.chunk_tokens, self.tile = reference, chunk_tokens, tile
        self.ref_ctx = attrs.evolve(ctx, lora_dropout=0.0)
        self.result: RowLogps | None = None

    def __call__(self, phase: Phase, unit: int, weights: Mapping[str, torch.Tensor]) -> None:
        if unit == self.spec.n_layers + 1:
            with torch.no_grad():
                per_token = token_logps(self.spec, weights, self.x, self.targets, self.chunk_tokens,
                                        self.ref_ctx.matmul_dtype)
            self.result = row_logps(per_token, self.answer_mask)
            return
        self.x = reference_layer(self, unit, weights, self.x)


def reference_logps_two_pass(engine: Any, cast: Any, spec: Any, ctx: Any, x0: torch.Tensor, targets: torch.Tensor,
                             answer_mask: torch.Tensor, reference: LoraState | None,
                             chunk_tokens: int = heads.DEFAULT_CHUNK_TOKENS, tile: int = 0) -> tuple[RowLogps, Any]:
    """The reference row log-probs from a separate forward pass through ``engine``.

    Args:
        cast: ``cast(weights)``: the model's compute-dtype cast of a unit's weights.

    Returns:
        ``(logps, report)``: the row log-probs and the pass's :class:`StepReport`.
    """
    forward = _ReferenceForward(spec, ctx, x0, targets, answer_mask, reference, chunk_tokens, tile)
    report = engine.run(lambda phase, unit, weights: forward(phase, unit, cast(weights)), mode="forward")
    assert forward.result is not None
    return forward.result, report
