"""Data parallel training: every rank trains on its share of each batch, the adapters stay equal.

When a process group of several ranks is initialised (torchrun), :class:`~lema.app.training.trainer.LemaTrainer`
hands its micro-steps, evaluations and checkpoints to :class:`DataParallel`. Each rank
streams the base weights to its own device and runs its rows of the batch; what must be
the same everywhere is summed over the ranks:

* the number of target tokens of the whole micro-batch, so every rank divides its summed
  loss by it: the gradients then add up to the gradient of the mean over the whole
  batch's target tokens, which is how one process defines the loss (not a mean of
  per-rank means). Its all-reduce starts before the pass and travels while the forward
  runs (:class:`~lema.app.parallel.rank_agreement.PendingSettle`); the pass waits for it
  at the head, where the divisor is first needed;
* the gradients, bucket by bucket while the backward runs (:mod:`lema.app.parallel.grad_buckets`),
  on the micro-step that ends an accumulation; clipping then sees the global norm on every
  rank and the optimizer steps agree;
* the loss sum, for the reported loss: in the last gradient bucket on the micro-step that
  ends an accumulation, else in a :func:`~lema.app.parallel.rank_agreement.settle` of its own.

So a micro-step waits for at most one collective besides the gradient buckets. Each of
these sums carries every rank's failure flag, so a failure on one rank (bad data, out of
memory) stops all of them with its message; evaluations and checkpoints begin and end
with a :func:`~lema.app.parallel.rank_agreement.settle`.

Example (under ``torchrun --nproc-per-node 2 script.py``)::

    torch.distributed.init_process_group("gloo")      # or "nccl", after torch.cuda.set_device
    trainer = model.get_trainer(optimizer)
    for batch in my_share_of_each_batch:               # rank r's rows of every global batch
        trainer.train_step(batch["input_ids"], labels=batch["labels"])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from lema.app.parallel import distributed
from lema.app.runtime.batches import as_batch, batches_to_tensors
from lema.app.parallel.grad_buckets import DEFAULT_BUCKET_BYTES, GradientBuckets
from lema.app.parallel.rank_agreement import PendingSettle, agree, peer_lost, settle

if TYPE_CHECKING:
    from lema.app.parallel.local_trainer import LocalTrainer


class DataParallel:
    """The collective side of a :class:`~lema.app.training.trainer.LemaTrainer` (see the module docstring).

    Args:
        trainer: the trainer whose micro-steps this runs.
        bucket_bytes: gradient bucket size (1: one bucket per decoder layer).
    """

    def __init__(self, trainer: LocalTrainer, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.trainer = trainer
        self.ranks = distributed.current()
        self.bucket_bytes = bucket_bytes
        self._lora: Any = None
        self._buckets: GradientBuckets | None = None

    # -- a micro-step ------------------------------------------------------------------------

    def micro_step(self, input_ids: Any, labels: Any, attention_mask: Any,
                   return_logits: bool = False, position_ids: Any = None) -> tuple[torch.Tensor | None, float]:
        """This rank's rows of one micro-batch (zero rows are allowed: the rank still takes
        part). Returns this rank's logits (with ``return_logits``) and the mean loss over the
        whole micro-batch's target tokens."""
        trainer = self.trainer
        model = trainer.model
        sync = trainer.micro_step + 1 >= trainer.accumulation
        batch, logits, error = None, None, None
        with model.device.measuring():
            try:
                if as_batch(input_ids, "input_ids").shape[0] > 0:
                    batch = trainer.prepare_batch(input_ids, labels, attention_mask, position_ids)
                elif model.lora_spec.dropout > 0:
                    # No rows, but the dropout stream moves on as on the other ranks (a
                    # checkpoint holds rank 0's, and every rank resumes from it).
                    torch.randint(0, 2**62, (1,), generator=model.dropout_generator)
            except Exception as exc:  # noqa: BLE001 - every rank learns of it in settle
                error = exc
            if not self._bound():
                # Once per set of adapters: every rank must be well before rank 0's go out.
                self._settle(error, [])
            buckets = self._bind()
            # The whole micro-batch's token count travels while the forward runs; the pass
            # waits for it at the head, where the loss divisor is first needed. A rank that
            # failed (or one leaving, through settle_on_exit) makes every rank raise there.
            pending = PendingSettle(error, [batch.n_tokens if batch is not None else 0])
            if sync:
                buckets.arm(carry=2)  # the failure flag and the loss sum ride in the last bucket
            error = None
            loss_sum = 0.0
            try:
                if batch is not None:
                    loss_sum, _, logits = trainer.run_batch(batch, token_count=lambda: int(pending.result()[0]),
                                                            keep_logits=return_logits)
            except Exception as exc:  # noqa: BLE001
                error = exc
            batch = None
            try:
                (total_tokens,) = pending.result()  # raised already at the head when a rank failed before
            except Exception:
                buckets.disarm()
                trainer.discard_accumulation()
                raise
            if sync:
                # A rank without rows, or one that failed mid-backward, still issues every
                # bucket's all-reduce (zeros), so the ranks' collectives stay in step.
                buckets.finish([1.0 if error is not None else 0.0, loss_sum if error is None else 0.0])
                failed, loss_total = buckets.wait()
                (loss_total,) = self._agree(error, failed, [loss_total])
            else:
                (loss_total,) = self._settle(error, [loss_sum])
            loss = loss_total / max(total_tokens, 1)
            trainer.end_micro_step(loss)  # the same loss and summed gradients on every rank
        return logits, loss

    def _settle(self, error: Exception | None, values: list[float]) -> list[float]:
        """:func:`settle`; when a rank failed, every rank first drops the micro-batches since
        the last optimizer step, so the trainers stay equal (and usable) after the error."""
        try:
            return settle(error, values)
        except Exception:
            self.trainer.discard_accumulation()
            raise

    def _agree(self, error: Exception | None, failed: float, sums: list[float]) -> list[float]:
        """:func:`agree` on a failure flag summed elsewhere (the last gradient bucket), with
        :meth:`_settle`'s dropping of the accumulation."""
        try:
            return agree(error, failed, sums)
        except Exception:
            self.trainer.discard_accumulation()
            raise

    def _bound(self) -> bool:
        """Whether the gradient hooks are on the model's current adapters."""
        return self._buckets is not None and self._lora is not None and self._lora is self.trainer.model.lora

    def _bind(self) -> GradientBuckets:
        """Once per set of adapters: give every rank rank 0's values and hook their gradients
        (a collective: called right after a settle, where all ranks are; nothing to do when
        :meth:`_bound`)."""
        model = self.trainer.model
        lora = model.require_lora()
        if lora is self._lora and self._buckets is not None:
            return self._buckets
        if self._buckets is not None:
            self._buckets.close()
        params = lora.parameters()
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params]).to(distributed.comm_device())
            try:
                distributed.broadcast(flat, src=0)
            except Exception as exc:  # noqa: BLE001
                raise peer_lost(exc) from None
            offset = 0
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        layers = [[t for pair in layer.values() for t in pair] for layer in lora.layers]
        self._buckets = GradientBuckets(layers, self.bucket_bytes,
                                        on_launch=lambda members: model.device.record("grad_allreduce", members))
        self._lora = lora
        return self._buckets

    # -- evaluation and checkpoints ----------------------------------------------------------

    def evaluate_totals(self, batches: Iterable[Any]) -> tuple[float, int]:
        """Summed loss and token count over all ranks; rank ``r`` scores batches ``r, r+N, ...``."""
        settle()
        total, count, error = 0.0, 0, None
        try:
            mine = (b for k, b in enumerate(batches_to_tensors(batches)) if k % self.ranks.world == self.ranks.rank)
            total, count = self.trainer.loss_totals(mine)
        except Exception as exc:  # noqa: BLE001
            error = exc
        total, count = settle(error, [total, count])
        return total, int(count)

    def save(self, path: str | Path, write: Callable[[dict[str, torch.Tensor]], Any]) -> Path:
        """Rank 0 calls ``write(gradients gathered so far, summed over the ranks)``; the
        others wait for it. Every rank must call this (it is collective)."""
        settle()
        trainer = self.trainer
        grads: dict[str, torch.Tensor] = {}
        if trainer.micro_step:
            named = trainer.model.require_lora().named_parameters()
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                              for _, p in named])
            try:
                distributed.all_reduce(flat)
            except Exception as exc:  # noqa: BLE001
                raise peer_lost(exc) from None
            offset = 0
            for name, p in named:
                grads[name] = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        error = None
        if self.ranks.is_main:
            try:
                write(grads)
            except Exception as exc:  # noqa: BLE001
                error = exc
        settle(error)
        return Path(path)

    def close(self) -> None:
        if self._buckets is not None:
            self._buckets.close()
            self._buckets = None
        self._lora = None
