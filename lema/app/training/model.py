"""LemaModel: the guide's facade over spec, plan, engine and adapters.

Example (the guide's workflow, with a tiny model)::

    config = LemaConfig(model_name_or_path="tiny", gbi_path="tiny.safetensors", lora_rank=8)
    model = LemaModel(config)
    model.initialize_lora()
    optimizer = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4)
    trainer = model.get_trainer(optimizer)
    logits, loss = trainer.train_step(input_ids, labels=input_ids)
    trainer.save_checkpoint("checkpoints/run1")

It is also a ``torch.nn.Module`` whose parameters are the adapters
(:mod:`lema.app.training.torch_module`): ``model(input_ids, labels=labels).loss.backward()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from lema.app import bootstrap
from lema.app.parallel import distributed
from lema.app.runtime.batches import as_batch
from lema.app.runtime.engine import Engine
from lema.app.runtime.step_report import StepReport
from lema.app.training.seeds import dropout_seed, init_seed
from lema.app.training.torch_module import AdapterModule
from lema.config import LemaConfig
from lema.domain.model import blocks, heads, tiling
from lema.domain.model.context import make_context
from lema.domain.nn.context import BlockContext, segment_ids
from lema.domain.model.lora import (
    LoraSpec,
    LoraState,
    adapter_config,
    from_peft_state_dict,
    init_lora,
    resolve_targets,
)
from lema.domain.plan.planner import MemoryPlan
from lema.domain.schedule.layer_schedule import Phase
from lema.errors import CheckpointError, ConfigError, DoesNotFitError
from lema.ports.device import Device
from lema.ports.host_memory import HostMemory

if TYPE_CHECKING:
    from lema.app.training.trainer import LemaTrainer

# Mixed into the LoRA dropout seed under data parallel: ranks drop out rows with different masks.
_RANK_SALT = 0x9E3779B97F4A7C15


class LemaModel(AdapterModule):
    """A base model whose frozen weights stream through the device, plus LoRA adapters.

    Construction reads only the weights file's header, plans memory for the configured
    training shape and raises :class:`~lema.errors.DoesNotFitError` (with the plan's
    explanation) before anything large is allocated.

    Args:
        config: the run's :class:`~lema.config.LemaConfig`.
        device: a :class:`~lema.ports.device.Device` to use instead of the one the config
            names (tests pass a ``CpuDevice`` with a capacity).
        host_memory: where the host RAM available is read (default ``/proc/meminfo``); a run needing
            more (RESIDENT on a model larger than RAM) raises HostMemoryError before anything loads.

    Raises:
        ConfigError, ModelFormatError, DoesNotFitError, HostMemoryError.
    """

    def __init__(self, config: LemaConfig, *, device: Device | None = None,
                 host_memory: HostMemory | None = None) -> None:
        super().__init__()
        self.config = config
        self._resolved = bootstrap.open_model(config)
        self.spec = self._resolved.spec
        targets = resolve_targets(self.spec.family, config.lora_target_modules)
        self.lora_spec = LoraSpec(rank=config.lora_rank, alpha=config.alpha, dropout=config.lora_dropout,
                                  targets=targets, use_rslora=config.use_rslora)
        self.device = device if device is not None else bootstrap.make_device(config)
        self.compute_dtype = bootstrap.compute_dtype(config, self.spec, self.device.traits, warn=True)
        self.matmul_dtype = self.device.matmul_dtype(self.compute_dtype)
        self._plan = bootstrap.make_plan(config, self.spec, self.device)
        if not self._plan.fits:
            raise DoesNotFitError(self._plan.explain(), self._plan)
        bootstrap.check_host_memory(config, self._plan, self.device, host_memory)  # before anything loads
        self.disk = bootstrap.plan_disk(config, self.spec, self._resolved, self._plan, self.device, host_memory)
        self.source = bootstrap.make_source(config.strategy, self._resolved, self.device, self.disk)
        self.engine = Engine(self.spec, self.source, self.device, prefetch=self._plan.shape.prefetch,
                             resident_units=self._plan.resident_units, plan=self._plan,
                             compute_dtype=self.compute_dtype, offload_inputs=self._plan.offload_activations)
        try:
            self.embedding = self.source.read_unit(0)  # a corrupt file is refused here: close what is open
        except BaseException:
            for part in (self.engine, self.source, self.device):
                part.close()
            raise
        self.lora: LoraState | None = None
        self.last_report: StepReport | None = None
        self._trainer: "LemaTrainer | None" = None
        self._pending_trainer_state: dict[str, Any] | None = None
        self._closed = False
        # LEMA's own RNG for LoRA dropout (never the global one): seeded by config.seed,
        # saved in checkpoints and restored on resume.
        self.dropout_generator = torch.Generator().manual_seed(dropout_seed(config.seed))

    # -- the guide's API ---------------------------------------------------------------

    def initialize_lora(self, seed: int | None = None) -> None:
        """Create fresh adapters (A Kaiming-uniform, B zero, like peft) on the device.

        ``seed`` (default ``config.seed``) seeds the initialisation and restarts the LoRA
        dropout stream, through LEMA's own generators: the global torch RNG is neither read
        nor changed, so the same seed gives the same adapters and the same training run.
        """
        seed = self.config.seed if seed is None else seed
        generator = torch.Generator().manual_seed(init_seed(seed))
        state = init_lora(self.spec, self.lora_spec, generator)
        self.dropout_generator.manual_seed(dropout_seed(seed))
        self.set_lora(state)

    def get_trainable_parameters(self) -> list[torch.Tensor]:
        """The LoRA tensors (fp32 leaves on the device), in a fixed order, for the optimizer."""
        return self.require_lora().parameters()

    def get_trainer(self, optimizer: torch.optim.Optimizer, *, reset_optimizer: bool = False,
                    **kwargs: Any) -> "LemaTrainer":
        """A :class:`~lema.app.training.trainer.LemaTrainer` driving this model with ``optimizer``.

        After :meth:`from_pretrained`, the checkpoint's optimizer, scheduler, step and RNG
        states are applied to it (see :meth:`LemaTrainer.restore`); ``reset_optimizer``
        starts ``optimizer`` fresh instead of from the saved state (needed when the
        checkpoint has none).
        """
        from lema.app.training.trainer import LemaTrainer

        self.require_lora()
        trainer = LemaTrainer(self, optimizer, **kwargs)
        if self._pending_trainer_state is not None:
            trainer.restore(self._pending_trainer_state, reset_optimizer=reset_optimizer)
            self._pending_trainer_state = None
        self._trainer = trainer
        return trainer

    def plan(self) -> MemoryPlan:
        """The memory plan this model runs under."""
        return self._plan

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, *, training: bool = False) -> torch.Tensor:
        """Float32 logits ``(batch, seq, vocab)`` of base + adapters; no gradients (what
        ``model(input_ids).logits`` returns). ``position_ids`` that restart at 0 mark packed
        examples (see :meth:`prepare_inputs`); ``training`` applies the LoRA dropout."""
        def head(weights: Any, x: torch.Tensor) -> torch.Tensor:
            return heads.head_logits(self.spec, weights, x, self.matmul_dtype)

        return self._forward_pass(input_ids, attention_mask, head, position_ids, training=training)

    @torch.no_grad()
    def scores(self, input_ids: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, *, keep_logits: bool = False,
               training: bool = False) -> tuple[float, int, torch.Tensor | None]:
        """One forward pass: summed loss, scored tokens and (with ``keep_logits``) the logits;
        ``training`` applies the LoRA dropout."""
        targets = self.targets_for(input_ids, labels, attention_mask, position_ids)

        def head(weights: Any, x: torch.Tensor) -> tuple[float, int, torch.Tensor | None]:
            loss_sum, n = heads.head_loss(self.spec, weights, x, targets, matmul_dtype=self.matmul_dtype)
            logits = heads.head_logits(self.spec, weights, x, self.matmul_dtype) if keep_logits else None
            return float(loss_sum), n, logits

        return self._forward_pass(input_ids, attention_mask, head, position_ids, training=training)

    @torch.no_grad()
    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> tuple[float, int]:
        """Summed next-token loss and the number of scored tokens (labels default to inputs)."""
        loss_sum, n, _ = self.scores(input_ids, labels, attention_mask, position_ids)
        return loss_sum, n

    def _forward_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      head: Callable[[Any, torch.Tensor], Any], position_ids: torch.Tensor | None = None,
                      training: bool = False) -> Any:
        """One forward pass through the engine; ``head(weights, x_L)`` makes the result."""
        with self.device.measuring():
            ctx, x = self.prepare_inputs(input_ids, attention_mask, training=training, position_ids=position_ids)
            state: dict[str, Any] = {"x": x}
            lora = self.lora
            tile = self._plan.tile_tokens

            def compute(phase: Phase, unit: int, weights: Any) -> None:
                weights = self.cast_weights(weights)
                if unit == self.spec.n_layers + 1:
                    state["result"] = head(weights, state["x"])
                    return
                layer = unit - 1
                adapters = lora.layer(layer) if lora is not None else None
                if 0 < tile < state["x"].shape[1]:  # long sequences: the plan's tiles, as in training
                    state["x"] = tiling.tiled_forward(self.spec, weights, adapters, state["x"], ctx, layer, tile)
                else:
                    state["x"] = blocks.decoder_block(self.spec, weights, adapters, state["x"], ctx, layer)

            self.last_report = self.engine.run(compute, mode="forward")
            return state["result"]

    def targets_for(self, input_ids: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None = None, on_host: bool = False) -> torch.Tensor:
        """A batch's next-token targets (labels or inputs, padding ignored), on the device or ``on_host``.

        In packed rows (``position_ids`` restarting at 0) the last token of an example does
        not predict the first token of the next one.
        """
        # Padding is not a target when the labels default to the inputs; explicit labels are
        # used as given, as transformers does.
        default = labels is None
        shape = as_batch(input_ids, "input_ids").shape
        labels = as_batch(input_ids if labels is None else labels, "labels")
        if labels.shape != shape:
            raise ConfigError(f"labels: shape {list(labels.shape)} differs from input_ids' {list(shape)}")
        bad = (labels != heads.IGNORE_INDEX) & ((labels < 0) | (labels >= self.spec.vocab_size))
        if bool(bad.any()):
            raise ConfigError(f"labels: {int(labels[bad][0])} is not a token id in [0, {self.spec.vocab_size}) "
                              f"nor {heads.IGNORE_INDEX} (ignored)")
        if default and attention_mask is not None:
            labels = labels.masked_fill(as_batch(attention_mask, "attention_mask") == 0, heads.IGNORE_INDEX)
        segments = None if position_ids is None else segment_ids(as_batch(position_ids, "position_ids"))
        if segments is not None:
            starts = torch.zeros_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            labels = labels.masked_fill(starts.to(labels.device), heads.IGNORE_INDEX)
        return heads.shift_labels(labels) if on_host else heads.shift_labels(labels).to(self.device.torch_device)

    # -- adapters and checkpoints --------------------------------------------------------

    def load_adapter(self, path: str | Path) -> None:
        """Load a peft LoRA adapter (trained by LEMA or by peft) for this base model.

        Raises:
            CheckpointError: missing files, a different base, or shapes/modules that do not
                match, listing every problem.
        """
        from lema.adapters.checkpoints.store import read_adapter

        config, tensors = read_adapter(path)
        spec, state = self.adapter_state(path, config, tensors)
        self.lora_spec = spec
        self.set_lora(state)

    def adapter_state(self, path: str | Path, config: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> tuple[LoraSpec, LoraState]:
        """The LoRA spec and state of a peft adapter's config and tensors, checked against
        this base model (CheckpointError naming ``path`` when they do not fit)."""
        try:
            spec = LoraSpec.from_adapter_config(config)
            return spec, from_peft_state_dict(self.spec, spec, tensors)
        except ConfigError as exc:  # targets of another architecture: an adapter for another base
            raise CheckpointError(f"{path}: this adapter does not fit the {self.spec.model_type} base model "
                                  f"({self.spec.n_layers} layers, hidden {self.spec.hidden_size}): {exc}") from None

    def adapter_config(self) -> dict[str, Any]:
        """peft's ``adapter_config.json`` for the current adapters."""
        base = self.config.model_name_or_path or self.config.gbi_path
        return adapter_config(self.spec, self.lora_spec, base)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, *, device: "Device | str | None" = None,
                        **overrides: Any) -> "LemaModel":
        """Rebuild model, adapter and trainer state from a LEMA checkpoint directory.

        The optimizer state is applied to the optimizer given to :meth:`get_trainer`.

        Args:
            checkpoint_dir: a directory written by ``LemaTrainer.save_checkpoint``.
            device: a Device object, or a device name (``"cpu"``, ``"cuda:1"``) that replaces
                the saved config's.
            **overrides: LemaConfig fields to change (e.g. ``gbi_path`` if the file moved).
        """
        from lema.adapters.checkpoints.store import read_checkpoint

        ckpt = read_checkpoint(checkpoint_dir)
        if not ckpt.trainer_state or "config" not in ckpt.trainer_state:
            raise CheckpointError(f"{checkpoint_dir}: trainer_state.json has no LemaConfig; "
                                  "use LemaModel(config).load_adapter(path) for a plain adapter")
        data = dict(ckpt.trainer_state["config"])
        if isinstance(device, str):
            overrides["device"], device = device, None
        data.update(overrides)
        try:
            config = LemaConfig.from_dict(data)
        except ConfigError as exc:
            raise CheckpointError(f"{checkpoint_dir}: trainer_state.json config is invalid: {exc}") from None
        model = cls(config, device=device)
        spec, state = model.adapter_state(checkpoint_dir, ckpt.adapter_config, ckpt.adapter_tensors)
        model.lora_spec = spec
        model.set_lora(state)
        model._pending_trainer_state = {"trainer_state": ckpt.trainer_state, "optimizer_tensors": ckpt.optimizer_tensors,
                                        "optimizer_meta": ckpt.optimizer_meta, "path": str(checkpoint_dir)}
        return model

    def input_paths(self) -> list[Path]:
        """The files and folders this model reads (weight files, the weights folder of a
        sharded model, the local ``model_name_or_path`` folder): what a save must not replace."""
        resolved = self._resolved
        paths = [resolved.root / f for f in self.spec.files] if resolved.root is not None else []
        if resolved.weights_path is not None:
            paths.append(Path(resolved.weights_path))
        if self.config.model_name_or_path and Path(self.config.model_name_or_path).is_dir():
            paths.append(Path(self.config.model_name_or_path))
        return paths

    def close(self) -> None:
        """Stop the prefetch thread, release the device slots, close the weight source (its
        open files) and the device; the model is unusable after. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.engine.close()
        finally:
            # The embedding views keep the file's mapping (and its descriptor) alive.
            self.embedding = {}
            self.source.close()
            self.device.close()

    def __enter__(self) -> "LemaModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the surface the trainer and generation use ---------------------------------

    def set_lora(self, state: LoraState) -> None:
        """Install ``state`` as the adapters, moved to the device and counted there; they
        become this module's parameters (the same tensors), under peft's names."""
        moved = state.to(self.device.torch_device)
        self.lora = LoraState(moved.lora_spec, tuple({k: (torch.nn.Parameter(a), torch.nn.Parameter(b))
                                                      for k, (a, b) in layer.items()} for layer in moved.layers))
        self.register_adapters(list(zip(self.lora.state_dict_peft(self.spec), self.lora.parameters())))
        nbytes = sum(t.numel() * t.element_size() for t in self.lora.parameters())
        self.device.track("lora_params", nbytes)

    def require_lora(self) -> LoraState:
        """The adapters; ConfigError when none were initialised or loaded yet."""
        if self.lora is None:
            raise ConfigError("no LoRA adapters yet: call model.initialize_lora() (or load_adapter) first")
        return self.lora

    def cast_weights(self, weights: Any) -> Any:
        """One unit's weights in the compute dtype (the same dict when nothing needs a cast)."""
        from lema.domain.nn.linear import cast_weights

        return cast_weights(weights, self.compute_dtype)

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       training: bool, position_ids: torch.Tensor | None = None) -> tuple[BlockContext, torch.Tensor]:
        """Validate a batch; return its block context and the embedded input on the device.

        ``position_ids`` default to ``0..seq-1`` in every row. Positions that restart at 0
        inside a row mark packed examples: attention is confined to each example (a
        block-diagonal causal mask), so each computes what it computes alone.
        """
        input_ids = as_batch(input_ids, "input_ids")
        if attention_mask is not None:
            attention_mask = as_batch(attention_mask, "attention_mask")
            if attention_mask.shape != input_ids.shape:
                raise ConfigError(f"attention_mask: shape {list(attention_mask.shape)} differs from input_ids' "
                                  f"{list(input_ids.shape)}")
        segments = None
        if position_ids is not None:
            position_ids = as_batch(position_ids, "position_ids")
            if position_ids.shape != input_ids.shape:
                raise ConfigError(f"position_ids: shape {list(position_ids.shape)} differs from input_ids' "
                                  f"{list(input_ids.shape)}")
            segments = segment_ids(position_ids)
        ids = input_ids.to("cpu")
        if int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size:
            raise ConfigError(f"input_ids: token ids must be in [0, {self.spec.vocab_size}); "
                              f"got {int(ids.min())}..{int(ids.max())}")
        dev = self.device.torch_device
        seed = 0
        if training and self.lora_spec.dropout > 0:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.dropout_generator))
            # Under torchrun every rank draws the same stream and drops out its own rows:
            # salted by the rank, so the ranks' masks differ.
            seed = (seed + _RANK_SALT * distributed.current().rank) % 2**62
        ctx = make_context(self.spec, tuple(ids.shape), attention_mask=attention_mask, device=dev,
                           dtype=self.compute_dtype, lora=self.lora_spec, training=training,
                           dropout_seed=seed, matmul_dtype=self.matmul_dtype, position_ids=position_ids,
                           segments=segments)
        # The embedding is gathered on the host from the mmap'd (or RAM) table: only the
        # (batch, seq, hidden) activations cross the link, never the vocab-sized matrix.
        host_ctx = ctx if self.device.traits.host_memory else make_context(
            self.spec, tuple(ids.shape), device="cpu", dtype=self.compute_dtype, position_ids=position_ids)
        x = blocks.embed(self.spec, self.embedding, ids, host_ctx).to(self.compute_dtype).to(dev)
        return ctx, x
