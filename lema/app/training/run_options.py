"""TrainOptions: a training run's options as values, ``lema train``'s options with its defaults
(the run use case, :func:`lema.app.training.run_training.run_training`, takes them)."""

from __future__ import annotations

from typing import Any

import attrs

from lema.domain.units import parse_size

__all__ = ["TrainOptions"]


@attrs.frozen(kw_only=True)
class TrainOptions:
    """A training run's options: ``lema train``'s, by the same names and with the same defaults
    (:mod:`lema.cli.train_options`); ``model_path`` is ``--model``, ``data_format`` ``--format``,
    ``offload`` ``--offload-activations``."""

    model_path: str
    data: str
    out: str
    data_format: str = "auto"
    chat_template: str | None = None
    packing: bool = False
    eval_data: str | None = None
    eval_split: float | None = None
    eval_steps: int = 0
    steps: int | None = None
    epochs: int | None = None
    batch: int = 4
    seq: int = 512
    lr: float = 2e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    rank: int = 16
    alpha: float | None = None
    lora_dropout: float = 0.0
    targets: str | None = None
    dtype: str = "auto"
    strategy: str = "streaming"
    vram: str | None = None
    grad_accum: int = 1
    save_steps: int = 0
    save_total_limit: int = 0
    report_to: str = "none"
    run_name: str | None = None
    resume: bool = False
    reset_optimizer: bool = False
    seed: int = 0
    tokenizer: str | None = None
    device: str = "auto"
    offload: bool | None = None
    prefetch: int | None = None  # None: "auto" (AUTO chooses the depth, another strategy reads 2 ahead)
    warmup: int = 0
    lr_schedule: str = "constant"
    max_line_size: str = "1M"
    data_cache: bool = True
    method: str = "sft"
    beta: float | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    adapter: str | None = None
    precompute_ref: bool = False
    nproc: int = 1  # torchrun's ranks (not an option: the launcher sets it)
    # -- the field's names and data mappings (issue 28)
    overwrite: bool = False
    warmup_ratio: float | None = None
    logging_steps: int | None = None
    evals_per_epoch: int | None = None
    saves_per_epoch: int | None = None
    more_data: tuple[str, ...] = ()  # the second and later --data
    data_weights: str | None = None
    data_epochs: str | None = None
    messages_field: str | None = None
    role_key: str | None = None
    content_key: str | None = None
    role_names: str | None = None
    roles_to_train: str = "assistant"
    train_on_inputs: bool = False
    text_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None

    def data_mapping(self) -> dict[str, Any]:
        """The data mapping options as :class:`~lema.data.loading.DataOptions` fields."""
        from lema.data.field_map import FieldMap, parse_roles, parse_roles_to_train

        fields = FieldMap(messages=self.messages_field, role=self.role_key, content=self.content_key,
                          roles=parse_roles(self.role_names), text=self.text_field, prompt=self.prompt_field,
                          completion=self.completion_field)
        return {"fields": fields, "train_on_inputs": self.train_on_inputs,
                "roles_to_train": parse_roles_to_train(self.roles_to_train)}

    @property
    def maps_data(self) -> bool:
        """Whether any data mapping option differs from its default."""
        return self.data_mapping() != TrainOptions(model_path="", data="", out="").data_mapping()

    @property
    def all_data(self) -> tuple[str, ...]:
        """Every ``--data``, in order."""
        return (self.data, *self.more_data)

    def objective(self) -> Any:
        """The preference objective of ``--method`` (None for sft; ConfigError on bad values)."""
        if self.method == "sft":
            return None
        from lema.domain.objectives.preference import PreferenceObjective

        return PreferenceObjective(self.method, beta=0.1 if self.beta is None else self.beta,
                                   label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
                                   cpo_alpha=self.cpo_alpha, desirable_weight=self.desirable_weight,
                                   undesirable_weight=self.undesirable_weight)

    @property
    def format(self) -> str | None:
        return None if self.data_format == "auto" else self.data_format

    def max_line_bytes(self) -> int:
        """``--max-line-size`` in bytes (ConfigError naming the option when it is not a size)."""
        return parse_size(self.max_line_size, field="--max-line-size")

    def args(self) -> dict[str, Any]:
        """What ``train_args.json`` records (compared on ``--resume``)."""
        return {"model": self.model_path, "data": str(self.data), "batch": self.batch, "seq": self.seq,
                "grad_accum": self.grad_accum, "seed": self.seed, "rank": self.rank, "alpha": self.alpha,
                "targets": self.targets, "lr": self.lr, "steps": self.steps, "epochs": self.epochs,
                "warmup": self.warmup, "lr_schedule": self.lr_schedule, "lora_dropout": self.lora_dropout,
                "global_batch": self.batch * self.nproc, "nproc": self.nproc, "format": self.format,
                "chat_template": self.chat_template, "packing": self.packing, "eval_split": self.eval_split,
                "eval_data": self.eval_data, "optimizer": self.optimizer, "weight_decay": self.weight_decay,
                "max_grad_norm": self.max_grad_norm, "dtype": self.dtype,
                **({} if self.method == "sft" else {"method": self.method, "objective": attrs.asdict(self.objective())}),
                **({} if self.adapter is None else {"adapter": self.adapter}),
                **({"precompute_ref": True} if self.precompute_ref else {}),
                **({"more_data": list(self.more_data), "data_weights": self.data_weights,
                    "data_epochs": self.data_epochs} if self.more_data else {}),
                **({"mapping": {k: str(v) for k, v in self.data_mapping().items()}}
                   if self.maps_data else {})}
