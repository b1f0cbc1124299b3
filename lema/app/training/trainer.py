"""LemaTrainer: train_step / evaluate / save_checkpoint / load_checkpoint, as in the user guide."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from lema.app.parallel import distributed
from lema.app.runtime.batches import batches_to_tensors
from lema.app.parallel.grad_buckets import DEFAULT_BUCKET_BYTES
from lema.app.training.batch_pass import PreparedBatch, step_with_cast
from lema.app.training.loss_scaling import LossScaler
from lema.app.training.seeds import generator_state, set_generator_state
from lema.app.runtime.training_pass import TrainingPass
from lema.domain.model import heads
from lema.errors import BaseDropoutWarning, CheckpointError, NonFiniteLossError

if TYPE_CHECKING:
    from lema.app.parallel.data_parallel import DataParallel
    from lema.app.training.trainable import TrainableModel


class LemaTrainer:
    """Runs the training data path of DESIGN.md §2 through the model's engine.

    Args:
        model: the :class:`~lema.app.training.model.LemaModel` (adapters initialised or loaded).
        optimizer: any torch optimizer over ``model.get_trainable_parameters()``.
        scheduler: an optional LR scheduler, stepped after every optimizer step.
        bucket_bytes: under a process group (torchrun), the size of the buckets in which the
            gradients are all-reduced during the backward (whole decoder layers per bucket;
            see :mod:`lema.app.parallel.data_parallel`).
    """

    def __init__(self, model: TrainableModel, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.bucket_bytes = bucket_bytes
        self.global_step = 0  # optimizer steps taken
        self.micro_step = 0  # micro-batches since the last optimizer step
        self.last_report = None
        self.before_optimizer_step: Callable[[], None] = lambda: None  # see lema.app.training.stop_signals
        self._dp: DataParallel | None = None
        # A float16 run scales its loss (lema.app.training.loss_scaling); no other dtype does.
        self.scaler: LossScaler | None = LossScaler() if model.compute_dtype == torch.float16 else None
        _warn_base_dropouts(model)

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale of a float16 run (None in other dtypes)."""
        return self.scaler.scale if self.scaler is not None else None

    @property
    def accumulation(self) -> int:
        return self.model.config.gradient_accumulation_steps

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, *, return_logits: bool = False,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float]:
        """One micro-batch: forward, backward, and (every ``gradient_accumulation_steps``)
        gradient clipping, ``optimizer.step()`` and ``zero_grad()``.

        Args:
            input_ids: ``(batch, seq)`` token ids (a 1-D tensor is one sequence).
            labels: ``(batch, seq)``; defaults to ``input_ids``; -100 is ignored; the shift
                to next-token targets happens inside.
            attention_mask: ``(batch, seq)`` 1 for tokens, 0 for padding.
            return_logits: also return the full float32 logits the loss was computed from
                (this step's forward, before the optimizer step; off by default so that the
                ``(batch, seq, vocab)`` logits never need to exist).
            position_ids: ``(batch, seq)`` positions; restarting at 0 inside a row marks packed
                examples (attention stays inside each; see ``LemaModel.prepare_inputs``).

        Returns:
            ``(logits, loss)``: logits (or None) and the mean loss of this micro-batch as a
            Python float.

        Raises:
            NonFiniteLossError: the loss (or, at an optimizer step, the gradient norm) is inf
                or NaN. The optimizer is not stepped; the gradients accumulated since the last
                optimizer step are discarded (``micro_step`` is 0 again), so training can go on
                from the last good state or stop there.

        Under a process group of several ranks (torchrun), each rank passes its rows of the
        micro-batch (possibly none) and gets the loss of the whole micro-batch; the
        gradients are summed over the ranks during the backward (see
        :mod:`lema.app.parallel.data_parallel` and docs/distributed.md).
        """
        dp = self._data_parallel()
        if dp is not None:
            return dp.micro_step(input_ids, labels, attention_mask, return_logits, position_ids=position_ids)
        # Everything the step allocates on the device counts: activations, gradients, and the
        # optimizer's states (created lazily by its first step).
        with self.model.device.measuring():
            batch = self.prepare_batch(input_ids, labels, attention_mask, position_ids)
            loss_sum, n_tokens, logits = self.run_batch(batch, keep_logits=return_logits)
            loss = loss_sum / max(n_tokens, 1)
            self.end_micro_step(loss)
        return logits, loss

    # -- the parts of a micro-step (data parallel runs them between collectives) ------------

    def prepare_batch(self, input_ids: torch.Tensor, labels: torch.Tensor | None,
                      attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
                      ) -> PreparedBatch:
        """Validate a micro-batch and embed it on the device (no pass yet)."""
        model = self.model
        model.require_lora()
        ctx, x0 = model.prepare_inputs(input_ids, attention_mask, training=True, position_ids=position_ids)
        targets = model.targets_for(input_ids, labels, attention_mask, position_ids, on_host=True)
        n = int((targets != heads.IGNORE_INDEX).sum())  # counted on the host: no device wait
        return PreparedBatch(ctx, x0, targets.to(model.device.torch_device), n)

    def run_batch(self, batch: PreparedBatch, token_count: int | Callable[[], int] | None = None,
                  keep_logits: bool = False) -> tuple[float, int, torch.Tensor | None]:
        """Forward and backward of a prepared micro-batch through the engine; gradients add
        into ``.grad``. The loss is divided by ``token_count`` target tokens (default: the
        batch's own; data parallel passes the count over all ranks) and by the accumulation.

        Returns:
            ``(loss_sum, n_tokens, logits)`` of this batch (logits only with ``keep_logits``).
        """
        model = self.model
        step = TrainingPass(model.spec, model.require_lora(), batch.ctx, batch.x0, batch.targets,
                            loss_scale=(self.loss_scale or 1.0) / self.accumulation,
                            checkpointing=model.config.checkpointing,
                            keep_logits=keep_logits, token_count=token_count, n_tokens=batch.n_tokens,
                            tile_tokens=model.plan().tile_tokens, kept_units=model.plan().kept_units)
        batch.release()  # the pass owns the tensors now, so they are freed as it moves on
        decoders = frozenset(u.index for u in model.spec.decoder_units)
        self.last_report = model.engine.run(step_with_cast(model, step), mode="train", backward_units=decoders,
                                            inputs=step)
        model.last_report = self.last_report
        return step.loss_sum, step.n_tokens, step.logits

    def end_micro_step(self, loss: float) -> None:
        """Count the micro-step (refusing a non-finite ``loss``); at the end of an
        accumulation, clip, step and zero."""
        if not math.isfinite(loss):
            self.discard_accumulation()
            raise NonFiniteLossError(f"step {self.global_step + 1}: the loss is {loss} (not finite); the optimizer "
                                     "was not stepped with it. Lower the learning rate, check the data, or "
                                     "resume from the last good checkpoint", step=self.global_step + 1, value=loss)
        self.micro_step += 1
        if self.micro_step >= self.accumulation:
            self._optimizer_step()

    def discard_accumulation(self) -> None:
        """Drop the gradients gathered since the last optimizer step (``micro_step`` = 0)."""
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.model.get_trainable_parameters():
            param.grad = None
        self.micro_step = 0

    def _optimizer_step(self) -> None:
        self.before_optimizer_step()  # from here the step is applied whole (no second Ctrl-C)
        params = self.model.get_trainable_parameters()
        max_norm = self.model.config.max_grad_norm
        grads = [p.grad for p in params if p.grad is not None]
        if self.scaler is not None and self.scaler.skips(grads):  # float16: an inf/NaN gradient skips the
            self.discard_accumulation()  # update (the scheduler waits, as transformers' Trainer does)
            self.global_step, self.last_grad_norm = self.global_step + 1, None
            return
        if max_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
                if grads else 0.0
        if not math.isfinite(norm):
            self.discard_accumulation()
            raise NonFiniteLossError(f"step {self.global_step + 1}: the gradient norm is {norm} (not finite); the "
                                     "optimizer was not stepped with it. Lower the learning rate, check the data, or "
                                     "resume from the last good checkpoint", step=self.global_step + 1, value=norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.scaler is not None:
            self.scaler.update(found_inf=False)
        self.global_step, self.micro_step, self.last_grad_norm = self.global_step + 1, 0, norm  # norm: before clipping

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """Mean token loss and perplexity over batches (dicts with input_ids/labels/attention_mask,
        tuples, or tensors), without touching gradients or the optimizer.

        Under a process group every rank passes the same batches; rank ``r`` scores batches
        ``r, r + N, ...`` and the sums are added over the ranks, so every rank returns what
        one process would (in 1/N of the time).
        """
        dp = self._data_parallel()
        if dp is not None:
            total, count = dp.evaluate_totals(batches)
        else:
            total, count = self.loss_totals(batches_to_tensors(batches))
        if count == 0:
            raise ValueError("evaluate: the batches hold no tokens to score")
        mean = total / count
        return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}

    def loss_totals(self, batches: Iterable[tuple[Any, ...]]) -> tuple[float, int]:
        """Summed loss and scored tokens of ``(input_ids, labels, attention_mask[, position_ids])``
        batches, here."""
        total, count = 0.0, 0
        for input_ids, labels, attention_mask, *rest in batches:
            loss_sum, n = self.model.loss(input_ids, labels, attention_mask, rest[0] if rest else None)
            total += loss_sum
            count += n
        return total, count

    def _data_parallel(self) -> DataParallel | None:
        """The data-parallel helper when a process group of several ranks is initialised."""
        if not distributed.active():
            return None
        if self._dp is None:
            from lema.app.parallel.data_parallel import DataParallel

            self._dp = DataParallel(self, self.bucket_bytes)
        return self._dp

    # -- checkpoints ------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path, tokenizer_dir: str | Path | None = None, *,
                        keep_existing: bool = False) -> Path:
        """Write a peft-compatible adapter plus optimizer and trainer state, atomically.

        The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (what
        ``peft.PeftModel.from_pretrained`` reads), ``optimizer.safetensors`` and
        ``trainer_state.json`` (step, accumulation position, RNG states, scheduler state and
        the LemaConfig). No pickle anywhere. A crash during the save leaves the previous
        checkpoint at ``path`` intact; it replaces only a checkpoint LEMA wrote (or an empty
        folder), and with ``keep_existing`` (a save after a failure or a signal) none: one of
        this step is kept as the saved state. Under a process group rank 0 writes.

        Raises:
            OutputError: ``path`` is, or contains, a file or folder the model reads.
            CheckpointError: ``path`` holds something the save may not replace.
        """
        dp = self._data_parallel()
        if dp is not None:
            return dp.save(path, lambda grads: self._write_checkpoint(path, tokenizer_dir, grads, keep_existing))
        grads = {name: p.grad for name, p in self.model.require_lora().named_parameters() if p.grad is not None}
        return self._write_checkpoint(path, tokenizer_dir, grads if self.micro_step else {}, keep_existing)

    def _write_checkpoint(self, path: str | Path, tokenizer_dir: str | Path | None,
                          grads: dict[str, torch.Tensor], keep_existing: bool = False) -> Path:
        from lema.app.outputs import check_output
        from lema.app.training.run_folder import keep_or_replace
        from lema.adapters.checkpoints.store import (
            optimizer_to_tensors,
            rng_state,
            write_checkpoint,
        )

        model = self.model
        check_output(path, option="checkpoint path", files=[*model.input_paths(), tokenizer_dir], overwrite=True,
                     replaces_folder=True)
        if keep_or_replace(Path(path), self.global_step if not self.micro_step else -1, keep_existing):
            return Path(path)  # this very state, saved before: a save after a failure keeps it
        named = model.require_lora().named_parameters()
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer, [name for name, _ in named])
        # Saved mid-accumulation, the gradients gathered so far are part of the state.
        for name, grad in grads.items():
            opt_tensors[f"{_GRAD_PREFIX}{name}"] = grad.detach()
        state = {
            "global_step": self.global_step,
            "micro_step": self.micro_step,
            "rng": rng_state(),
            "dropout_rng": generator_state(model.dropout_generator),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "loss_scale": self.scaler.state_dict() if self.scaler is not None else None,
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

    def load_checkpoint(self, path: str | Path, *, reset_optimizer: bool = False) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint`: its adapters are
        copied into this model's (the optimizer keeps its parameters), then the optimizer,
        scheduler, step counters and RNG states are restored as :meth:`restore` does.

        Raises:
            CheckpointError: a missing or corrupt checkpoint, adapters of another shape, or
                (without ``reset_optimizer``) no optimizer state.
        """
        from lema.adapters.checkpoints.store import read_checkpoint

        ckpt = read_checkpoint(path)
        if not ckpt.trainer_state:
            raise CheckpointError(f"{path}: no trainer_state.json; it is an adapter, not a training checkpoint: "
                                  "use model.load_adapter(path)")
        _, state = self.model.adapter_state(path, ckpt.adapter_config, ckpt.adapter_tensors)
        mine = self.model.require_lora().named_parameters()
        theirs = dict(state.named_parameters())
        wrong = [n for n, p in mine if n not in theirs or theirs[n].shape != p.shape]
        if wrong or len(theirs) != len(mine):
            raise CheckpointError(f"{path}: its adapters (rank, targets) differ from this model's "
                                  f"(e.g. {(wrong or sorted(theirs))[0]}); build the model with the checkpoint's "
                                  "LoRA settings, or use LemaModel.from_pretrained(path)")
        with torch.no_grad():
            for name, param in mine:
                param.copy_(theirs[name].to(device=param.device, dtype=param.dtype))
        self.restore({"trainer_state": ckpt.trainer_state, "optimizer_tensors": ckpt.optimizer_tensors,
                      "optimizer_meta": ckpt.optimizer_meta, "path": str(path)}, reset_optimizer=reset_optimizer)

    def restore(self, pending: dict[str, Any], *, reset_optimizer: bool = False) -> None:
        """Apply a checkpoint's trainer and optimizer state (called by ``get_trainer`` after
        ``LemaModel.from_pretrained``, and by :meth:`load_checkpoint`).

        Restores the step counters, the gradients of an unfinished accumulation, the
        optimizer and scheduler states, the global RNG states and LEMA's dropout generator.

        Args:
            pending: ``trainer_state``, ``optimizer_tensors``, ``optimizer_meta`` and the
                checkpoint's ``path``.
            reset_optimizer: start the optimizer fresh instead of from the saved state.

        Raises:
            CheckpointError: the checkpoint has no optimizer state and ``reset_optimizer`` is
                False (resuming would silently restart the optimizer's moments).
        """
        from lema.adapters.checkpoints.checkpoint_fields import check_scheduler_state
        from lema.adapters.checkpoints.store import load_optimizer_state, set_rng_state

        state = pending["trainer_state"]
        where = pending.get("path", "the checkpoint")
        has_optimizer = pending.get("optimizer_tensors") is not None and pending.get("optimizer_meta") is not None
        if not has_optimizer and not reset_optimizer:
            raise CheckpointError(f"{where}: optimizer.safetensors is missing, so this would not be an exact resume "
                                  "(the optimizer's moments would restart from zero); restore the file, or pass "
                                  "--reset-optimizer (reset_optimizer=True) to continue with a fresh optimizer")
        self.global_step = int(state.get("global_step", 0))
        self.micro_step = int(state.get("micro_step", 0))
        if has_optimizer and not reset_optimizer:
            load_optimizer_state(self.optimizer, pending["optimizer_tensors"], pending["optimizer_meta"])
        # The gathered gradients are the sum over all ranks: one rank holds them, the others
        # start from zero, so the next all-reduce adds them once.
        tensors = (pending.get("optimizer_tensors") or {}) if distributed.current().is_main else {}
        for name, param in self.model.require_lora().named_parameters():
            grad = tensors.get(f"{_GRAD_PREFIX}{name}")
            if grad is not None:
                param.grad = grad.to(device=param.device, dtype=param.dtype).clone()
        if self.scheduler is not None and state.get("scheduler") is not None:
            check_scheduler_state(state["scheduler"], self.scheduler.state_dict(), "trainer_state.json")
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("loss_scale") is not None:
            self.scaler.load_state_dict(state["loss_scale"], where)
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        if state.get("dropout_rng") is not None:
            set_generator_state(self.model.dropout_generator, state["dropout_rng"])

    # -- RNG snapshots (the CLI loop rolls back to an optimizer-step boundary) ------------

    def rng_snapshot(self) -> dict[str, Any]:
        """The global RNG states and LEMA's dropout generator, as :meth:`restore_rng` takes them."""
        from lema.adapters.checkpoints.store import rng_state

        return {"rng": rng_state(), "dropout_rng": generator_state(self.model.dropout_generator)}

    def restore_rng(self, snapshot: dict[str, Any]) -> None:
        """Put the RNG states back to a :meth:`rng_snapshot`."""
        from lema.adapters.checkpoints.store import set_rng_state

        set_rng_state(snapshot["rng"])
        set_generator_state(self.model.dropout_generator, snapshot["dropout_rng"])


_GRAD_PREFIX = "accumulated_grad."


def _warn_base_dropouts(model: TrainableModel) -> None:
    from lema.domain.families.registry import base_dropouts

    found = base_dropouts(json.loads(model.spec.config_json))
    if found:
        listed = ", ".join(f"{k}={v:g}" for k, v in found.items())
        warnings.warn(f"the {model.spec.model_type} config sets {listed}: LEMA does not apply the frozen base model's "
                      "own dropouts (training matches transformers with them at 0); lora_dropout regularises the "
                      "adapters", BaseDropoutWarning, stacklevel=4)


def _version() -> str:
    from lema import __version__

    return __version__
