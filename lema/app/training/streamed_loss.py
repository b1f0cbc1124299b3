"""The streamed training pass as a ``torch.autograd.Function``: ``loss.backward()`` for LemaModel.

A LemaModel's loss is a function of the adapters whose graph never exists whole: the base
weights stream through the device one unit at a time, and each decoder layer is recomputed
from its checkpointed input in the backward (DESIGN.md §2). :class:`StreamedLoss` wraps that
pass so autograd sees one node, the adapters as its inputs and the mean loss as its output:

* forward: the engine's training pass over the schedule, exactly as
  :meth:`LemaTrainer.train_step <lema.app.training.trainer.LemaTrainer.train_step>` runs it
  (forward through the layers keeping what the engine keeps, the loss at the head, then the
  streamed backward through the layers, which reuses the head's weights at the turn of the
  schedule instead of streaming the model a second time). The gradients of the mean loss
  with respect to the adapters are kept aside, in buffers of their own: the adapters'
  ``.grad`` are left as they were;
* backward: the gradient coming in (1 for ``loss.backward()``, ``1/N`` when a trainer
  divides the loss by its accumulation steps, ``2 * loss`` for ``(loss ** 2).backward()``)
  multiplies those buffers in place, and autograd adds them to the adapters' ``.grad``.

The loss is a scalar, so the chain rule makes this exact: ``d f(L) / dθ = f'(L) · dL/dθ``
for any ``f``. The price: a forward with gradients enabled does the backward work even if
``backward()`` is never called; under ``torch.no_grad()`` (evaluation) the model runs a
forward pass only (:meth:`LemaModel.forward <lema.app.training.model.LemaModel.forward>`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lema.app.runtime.training_pass import TrainingPass
from lema.app.training.trainable import TrainableModel
from lema.app.training.batch_pass import step_with_cast

PassResult = tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor | None]


class StreamedLoss(torch.autograd.Function):
    """``StreamedLoss.apply(run, *adapters)``: the mean loss, differentiable in the adapters.

    ``run()`` does the streamed pass and returns ``(loss, grads, logits)`` (see
    :func:`streamed_pass`); the logits, when kept, are stored on the function's ``run``
    object as ``run.logits`` for the caller (they carry no gradient).
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[[], PassResult], *adapters: torch.Tensor) -> torch.Tensor:
        loss, grads, logits = run()
        run.logits = logits  # type: ignore[attr-defined]
        ctx.grads = grads
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("LemaModel: backward through the same loss twice; the streamed pass keeps its "
                               "gradients for one backward (run the forward again)")
        for g in grads:
            if g is not None:
                g.mul_(grad_output.to(g.dtype))  # in place: no second adapter-sized buffer
        return (None, *grads)


def streamed_pass(model: TrainableModel, input_ids: torch.Tensor, labels: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, *,
                  training: bool, keep_logits: bool) -> PassResult:
    """One training pass through the engine; returns ``(mean loss, adapter grads, logits)``.

    The same pass as ``train_step`` with one micro-batch per step (loss divided by the
    batch's own target tokens, no accumulation scale): everything it allocates counts on
    the device (``measuring``). The adapters' ``.grad`` are put back as they were; the
    gradients of this pass are returned in parameter order (None for an adapter the loss
    does not reach).
    """
    params = model.get_trainable_parameters()
    before = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with model.device.measuring():
            ctx, x0 = model.prepare_inputs(input_ids, attention_mask, training=training, position_ids=position_ids)
            targets = model.targets_for(input_ids, labels, attention_mask, position_ids)
            step = TrainingPass(model.spec, model.require_lora(), ctx, x0, targets, loss_scale=1.0,
                                checkpointing=model.config.checkpointing, keep_logits=keep_logits,
                                tile_tokens=model.plan().tile_tokens, kept_units=model.plan().kept_units)
            del ctx, x0, targets  # the pass owns them now, so they are freed as it moves on
            decoders = frozenset(u.index for u in model.spec.decoder_units)
            model.last_report = model.engine.run(step_with_cast(model, step), mode="train", backward_units=decoders,
                                                 inputs=step)
            grads = [p.grad for p in params]
    finally:
        for p, g in zip(params, before):
            p.grad = g
    loss = torch.tensor(step.loss_sum / max(step.n_tokens, 1), dtype=torch.float32, device=model.device.torch_device)
    return loss, grads, step.logits
