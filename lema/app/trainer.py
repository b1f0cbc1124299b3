"""LemaTrainer: train_step / evaluate / save_checkpoint, as in the user guide."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from lema.app.batches import batches_to_tensors
from lema.app.training_pass import TrainingPass

if TYPE_CHECKING:
    from lema.app.model import LemaModel


class LemaTrainer:
    """Runs the training data path of DESIGN.md §2 through the model's engine.

    Args:
        model: the :class:`~lema.app.model.LemaModel` (adapters initialised or loaded).
        optimizer: any torch optimizer over ``model.get_trainable_parameters()``.
        scheduler: an optional LR scheduler, stepped after every optimizer step.
    """

    def __init__(self, model: LemaModel, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.global_step = 0  # optimizer steps taken
        self.micro_step = 0  # micro-batches since the last optimizer step
        self.last_report = None

    @property
    def accumulation(self) -> int:
        return self.model.config.gradient_accumulation_steps

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, *, return_logits: bool = False
                   ) -> tuple[torch.Tensor | None, float]:
        """One micro-batch: forward, backward, and (every ``gradient_accumulation_steps``)
        gradient clipping, ``optimizer.step()`` and ``zero_grad()``.

        Args:
            input_ids: ``(batch, seq)`` token ids (a 1-D tensor is one sequence).
            labels: ``(batch, seq)``; defaults to ``input_ids``; -100 is ignored; the shift
                to next-token targets happens inside.
            attention_mask: ``(batch, seq)`` 1 for tokens, 0 for padding.
            return_logits: also compute the full float32 logits (costs a forward pass; off by
                default so that the (batch, seq, vocab) logits never need to exist).

        Returns:
            ``(logits, loss)``: logits (or None) and the mean loss of this micro-batch as a
            Python float.
        """
        model = self.model
        lora = model.require_lora()
        # Everything the step allocates on the device counts: activations, gradients, and the
        # optimizer's states (created lazily by its first step).
        with model.device.measuring():
            ctx, x0 = model.prepare_inputs(input_ids, attention_mask, training=True)
            targets = model.targets_for(input_ids, labels, attention_mask)
            step = TrainingPass(model.spec, lora, ctx, x0, targets, loss_scale=1.0 / self.accumulation,
                                checkpointing=model.config.gradient_checkpointing)
            del x0
            decoders = frozenset(u.index for u in model.spec.decoder_units)
            self.last_report = model.engine.run(step_with_cast(model, step), mode="train",
                                                backward_units=decoders)
            model.last_report = self.last_report
            loss = step.loss_sum / max(step.n_tokens, 1)
            del step, ctx, targets
            self.micro_step += 1
            if self.micro_step >= self.accumulation:
                self._optimizer_step()
        logits = model.forward(input_ids, attention_mask) if return_logits else None
        return logits, loss

    def _optimizer_step(self) -> None:
        params = self.model.get_trainable_parameters()
        max_norm = self.model.config.max_grad_norm
        if max_norm:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        self.micro_step = 0

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """Mean token loss and perplexity over batches (dicts with input_ids/labels/attention_mask,
        tuples, or tensors), without touching gradients or the optimizer."""
        model = self.model
        total, count = 0.0, 0
        for input_ids, labels, attention_mask in batches_to_tensors(batches):
            loss_sum, n = model.loss(input_ids, labels, attention_mask)
            total += loss_sum
            count += n
        if count == 0:
            raise ValueError("evaluate: the batches hold no tokens to score")
        mean = total / count
        return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}

    # -- checkpoints ------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
        """Write a peft-compatible adapter plus optimizer and trainer state, atomically.

        The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (what
        ``peft.PeftModel.from_pretrained`` reads), ``optimizer.safetensors`` and
        ``trainer_state.json`` (step, accumulation position, RNG states, scheduler state and
        the LemaConfig). No pickle anywhere. A crash during the save leaves the previous
        checkpoint at ``path`` intact.
        """
        from lema.adapters.checkpoints.store import (
            optimizer_to_tensors,
            rng_state,
            write_checkpoint,
        )

        model = self.model
        named = model.require_lora().named_parameters()
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer, [name for name, _ in named])
        # Saved mid-accumulation, the gradients gathered so far are part of the state.
        for name, param in named:
            if self.micro_step and param.grad is not None:
                opt_tensors[f"{_GRAD_PREFIX}{name}"] = param.grad.detach()
        state = {
            "global_step": self.global_step,
            "micro_step": self.micro_step,
            "rng": rng_state(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "config": model.config.to_dict(),
            "lema_version": _version(),
        }
        if tokenizer_dir is None and model.config.model_name_or_path and Path(model.config.model_name_or_path).is_dir():
            tokenizer_dir = model.config.model_name_or_path
        write_checkpoint(path, adapter_tensors=model.require_lora().state_dict_peft(model.spec),
                         adapter_config=model.adapter_config(), optimizer_tensors=opt_tensors,
                         optimizer_meta=opt_meta,
                         trainer_state=state, tokenizer_dir=tokenizer_dir)
        return Path(path)

    def restore(self, pending: dict[str, Any]) -> None:
        """Apply a checkpoint's trainer and optimizer state (called by ``get_trainer``)."""
        from lema.adapters.checkpoints.store import load_optimizer_state, set_rng_state

        state = pending["trainer_state"]
        self.global_step = int(state.get("global_step", 0))
        self.micro_step = int(state.get("micro_step", 0))
        if pending.get("optimizer_tensors") is not None and pending.get("optimizer_meta") is not None:
            load_optimizer_state(self.optimizer, pending["optimizer_tensors"], pending["optimizer_meta"])
        tensors = pending.get("optimizer_tensors") or {}
        for name, param in self.model.require_lora().named_parameters():
            grad = tensors.get(f"{_GRAD_PREFIX}{name}")
            if grad is not None:
                param.grad = grad.to(device=param.device, dtype=param.dtype).clone()
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])


_GRAD_PREFIX = "accumulated_grad."


def step_with_cast(model: LemaModel, step: TrainingPass):
    """Wrap a training pass so weights are cast to the model's compute dtype first."""

    def compute(phase, unit, weights):
        step(phase, unit, model.cast_weights(weights))

    return compute


def _version() -> str:
    from lema import __version__

    return __version__
