"""One micro-step of a preference objective (DPO, IPO, ORPO, SimPO, KTO) through the trainer's engine.

:func:`use_preference` makes a :class:`~lema.app.training.trainer.LemaTrainer`'s ``train_step``
run :func:`preference_step` (the trainer's own method again with ``objective=None``); the
pass itself is :class:`lema.app.runtime.preference_pass.PreferencePass`.

``use_preference(trainer, objective, reference)``: ``objective`` a
:class:`~lema.domain.objectives.preference.PreferenceObjective`, ``reference`` the reference
model's adapter: a frozen copy of the adapter the run started from (:func:`frozen_adapter`),
or None for the base model itself (a fresh adapter, as TRL does for a peft model without
one). Batches are then paired rows ``[chosen..., rejected...]`` (KTO: ``[completions...,
mismatched completions...]`` plus ``desirable``) with ``labels`` on the answer tokens
(:mod:`lema.data.preference`); ``trainer.last_metrics`` holds each micro-batch's TRL-named
values and ``trainer.step_metrics`` their mean over the last optimizer step.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lema.domain.model import heads
from lema.errors import ConfigError


def use_preference(trainer: Any, objective: Any, reference: Any = None) -> None:
    """Train ``objective`` (None: back to SFT) against ``reference`` (see the module docstring)."""
    trainer.objective, trainer.reference, trainer.last_metrics, trainer.step_metrics = objective, reference, {}, {}
    # the frozen adapter lives on the device for the run (the plan's "reference_adapter")
    trainer.model.device.track("reference_adapter", 0 if reference is None or objective is None else sum(
        t.numel() * t.element_size() for layer in reference.layers for pair in layer.values() for t in pair))
    if objective is None:
        trainer.__dict__.pop("train_step", None)
    else:
        trainer.train_step = functools.partial(_train_step, trainer)


def _train_step(trainer: Any, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, return_logits: bool = False,
                position_ids: torch.Tensor | None = None, desirable: torch.Tensor | None = None,
                reference: torch.Tensor | None = None) -> tuple[None, float]:
    """``train_step`` under a preference objective: ``(None, loss)`` (no logits, no packed rows).

    ``reference``: the rows' precomputed reference answer log-prob sums (the cached column,
    :mod:`lema.app.training.reference_cache`); the pass then skips the reference forward.
    """
    if return_logits or position_ids is not None:
        raise ConfigError("preference steps take neither return_logits nor position_ids (packed rows)")
    if reference is None and getattr(trainer, "precomputed_reference", False):
        raise ConfigError("this run's reference log-probs are precomputed (--precompute-ref): every batch needs "
                          "its 'reference' values")
    return None, preference_step(trainer, input_ids, labels, attention_mask, desirable, reference)


def preference_step(trainer: Any, input_ids: torch.Tensor, labels: torch.Tensor | None,
                    attention_mask: torch.Tensor | None, desirable: torch.Tensor | None,
                    reference: torch.Tensor | None = None) -> float:
    """Forward (policy and same-pass reference), backward, and the accumulation's optimizer step.

    Sets ``trainer.last_metrics`` (this micro-batch's TRL-named values) and, at an optimizer
    step, ``trainer.step_metrics`` (their mean over the accumulation, ``loss`` left out).

    Returns:
        The micro-batch's mean loss.
    """
    from lema.app.runtime.preference_pass import PreferencePass

    if trainer._data_parallel() is not None:
        raise ConfigError("preference objectives run on one process for now (no torchrun)")
    if labels is None:
        raise ConfigError("a preference batch needs labels marking the answer tokens")
    model = trainer.model
    if trainer.micro_step == 0:
        trainer._gathered = {}
    with model.device.measuring():
        batch = trainer.prepare_batch(input_ids, None, attention_mask, None)
        answer = model.targets_for(input_ids, labels, attention_mask) != heads.IGNORE_INDEX
        full = batch.targets != heads.IGNORE_INDEX
        objective = trainer.objective
        precomputed = None
        if reference is not None and objective.needs_reference:
            from lema.domain.objectives.preference import RowLogps

            precomputed = RowLogps(reference.to(answer.device, torch.float32), answer.sum(dim=1).float())
        step = PreferencePass(model.spec, model.require_lora(), batch.ctx, batch.x0, batch.targets,
                              loss_scale=(trainer.loss_scale or 1.0) / trainer.accumulation,
                              checkpointing=model.config.checkpointing,
                              tile_tokens=model.plan().tile_tokens, kept_units=model.plan().kept_units,
                              objective=objective, answer_mask=answer,
                              full_mask=full if objective.needs_full else None, reference=trainer.reference,
                              desirable=desirable, precomputed=precomputed)
        batch.release()
        decoders = frozenset(u.index for u in model.spec.decoder_units)
        trainer.last_report = model.engine.run(lambda phase, unit, w: step(phase, unit, model.cast_weights(w)),
                                               mode="train", backward_units=decoders, inputs=step)
        model.last_report = trainer.last_report
        trainer.last_metrics = dict(step.metrics)
        for name, value in step.metrics.items():
            trainer._gathered.setdefault(name, []).append(value)
        loss = float(step.loss_sum)
        trainer.end_micro_step(loss)
    if trainer.micro_step == 0:  # an optimizer step was taken
        trainer.step_metrics = {k: sum(v) / len(v) for k, v in trainer._gathered.items() if k != "loss"}
    return loss


def frozen_adapter(lora: Any) -> Any:
    """A frozen copy of a :class:`~lema.domain.model.lora.LoraState` (the reference model's adapter)."""
    from lema.domain.model.lora import LoraState

    return LoraState(lora.lora_spec, tuple({k: tuple(t.detach().clone() for t in pair) for k, pair in layer.items()}
                                           for layer in lora.layers))


