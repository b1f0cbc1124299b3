"""LemaConfig: everything a training run is configured by (frozen, validated).

Example:
    >>> from lema import LemaConfig, MemoryStrategy
    >>> cfg = LemaConfig(model_name_or_path="tiny", gbi_path="tiny.safetensors", lora_rank=8)
    >>> cfg.strategy is MemoryStrategy.STREAMING
    True
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import attrs

from lema.domain.plan.inputs import DEFAULT_PREFETCH
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.units import parse_size
from lema.errors import ConfigError

__all__ = ["LemaConfig", "MemoryStrategy"]

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name}: {value!r} must be a positive integer")


def _non_negative_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name}: {value!r} must be an integer >= 0")


def _prefetch(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str) and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name}: {value!r} must be an integer >= 0 or 'auto'")


def _check_size(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        parse_size(value, field=attribute.name)


def _targets(value: Sequence[str] | str | None) -> Any:
    # Anything but a string or a list is left as it is for __attrs_post_init__ to report.
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


# torch's generators take seeds in this range (a larger one raises deep inside torch).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@attrs.frozen(kw_only=True)
class LemaConfig:
    """Configuration of a LEMA model and its training run.

    Attributes:
        model_name_or_path: Hugging Face id or folder of the base model (config, tokenizer).
        gbi_path: the monolithic ``.safetensors`` file with the weights (made by
            ``prepare_monolithic_safetensors``); None to read ``model_name_or_path`` directly
            when it is a local file or folder of safetensors.
        strategy: ``MemoryStrategy.STREAMING`` (default), ``RESIDENT`` or ``AUTO``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: compute dtype of the base weights; ``"auto"`` keeps the file's.
        lora_rank, lora_alpha, lora_dropout, lora_target_modules, use_rslora: the adapter.
            ``lora_target_modules=None`` uses the architecture's default (all attention and
            MLP projections for Llama-family models, ``c_attn`` for GPT-2).
        gradient_checkpointing: ``True`` keeps only each layer's input and recomputes the layer
            in backward; ``False`` keeps every layer's activations; ``"auto"`` (default):
            with ``strategy=AUTO`` the plan chooses which layers keep their activations by
            predicted step time within the budget (``lema plan`` says which), otherwise ``True``.
        offload_activations: ``True`` keeps those inputs in host memory (pinned on CUDA)
            between each layer's forward and its backward, ``False`` on the device;
            ``"auto"`` (default) turns it on when the memory plan needs it to fit. With long
            sequences the planner also runs each layer over sequence tiles when needed.
        prefetch_distance: how many layers are read ahead of the one computing (an integer
            >= 0; each costs a device slot of the largest streamed unit); ``"auto"`` (default):
            with ``strategy=AUTO`` the plan chooses the depth 0..4 with the smallest predicted
            step among those that fit (``lema plan`` says why), otherwise 2. A number is kept.
        vram_budget, ram_budget: byte sizes ("8G", an int) the plan must fit; None = the
            device's capacity (CUDA) or unlimited (CPU).
        batch_size, max_seq_len: the training shape the memory plan is checked for.
        max_grad_norm: clip the LoRA gradients' global norm (None or 0 to disable).
        gradient_accumulation_steps: micro-batches per optimizer step.
        seed: seeds the adapter initialisation and dropout.
        preference: what the memory plan adds for a preference step (``lema train --method``):
            None (SFT), ``"pairs"`` (ORPO, SimPO), ``"reference"`` (DPO, IPO, KTO against the
            base model) or ``"reference_adapter"`` (against a frozen starting adapter); then
            ``batch_size`` counts rows, two per pair (:mod:`lema.domain.plan.preference`).
        packed_rows: the batches pack several examples per row (``position_ids`` restarting at
            0; ``lema train --packing`` sets it): the memory plan counts the per-example
            attention's one more attention output (a sliding window shorter than
            ``max_seq_len`` is counted from the model itself).
    """

    model_name_or_path: str | None = None
    gbi_path: str | None = None
    strategy: MemoryStrategy = attrs.field(default=MemoryStrategy.STREAMING, converter=MemoryStrategy.parse)
    device: str = "auto"
    dtype: str = "auto"
    lora_rank: int = attrs.field(default=16, validator=_positive_int)
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | None = attrs.field(default=None, converter=_targets)
    use_rslora: bool = False
    gradient_checkpointing: bool | str = "auto"
    offload_activations: bool | str = "auto"
    prefetch_distance: int | str = attrs.field(default="auto", validator=_prefetch)
    vram_budget: str | int | None = attrs.field(default=None, validator=_check_size)
    ram_budget: str | int | None = attrs.field(default=None, validator=_check_size)
    batch_size: int = attrs.field(default=1, validator=_positive_int)
    max_seq_len: int = attrs.field(default=512, validator=_positive_int)
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = attrs.field(default=1, validator=_positive_int)
    seed: int = 0
    preference: str | None = None
    packed_rows: bool = False

    def __attrs_post_init__(self) -> None:
        problems = []
        if self.model_name_or_path is None and self.gbi_path is None:
            problems.append("model_name_or_path or gbi_path: one of them is required")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            problems.append(f"device: {self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not isinstance(self.dtype, str) or self.dtype.lower() not in _DTYPES:
            problems.append(f"dtype: {self.dtype!r} must be one of {', '.join(_DTYPES)}")
        if self.lora_alpha is not None and not (_finite(self.lora_alpha) and self.lora_alpha > 0):
            problems.append(f"lora_alpha: {self.lora_alpha!r} must be a positive number")
        if not (_finite(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
            problems.append(f"lora_dropout: {self.lora_dropout!r} must be in [0, 1)")
        if self.max_grad_norm is not None and not (_finite(self.max_grad_norm) and self.max_grad_norm >= 0):
            problems.append(f"max_grad_norm: {self.max_grad_norm!r} must be a number >= 0 or None")
        if self.lora_target_modules is not None and (
            not isinstance(self.lora_target_modules, tuple) or not self.lora_target_modules
            or not all(isinstance(t, str) and t for t in self.lora_target_modules)
        ):
            problems.append(f"lora_target_modules: {self.lora_target_modules!r} must be a non-empty list of names")
        problems += seed_problems(self.seed)
        for name in ("model_name_or_path", "gbi_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                problems.append(f"{name}: {value!r} must be a path (a string) or None")
        if not isinstance(self.use_rslora, bool):
            problems.append(f"use_rslora: {self.use_rslora!r} must be True or False")
        if not (isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto"):
            problems.append(f"gradient_checkpointing: {self.gradient_checkpointing!r} must be True, False or 'auto'")
        if self.offload_activations not in (True, False, "auto") or not isinstance(self.offload_activations, (bool, str)):
            problems.append(f"offload_activations: {self.offload_activations!r} must be True, False or 'auto'")
        elif self.offload_activations is True and self.gradient_checkpointing is False:
            problems.append("offload_activations=True moves the checkpointed layer inputs to host memory: it needs "
                            "gradient_checkpointing=True (or use offload_activations='auto')")
        if problems:
            raise ConfigError("invalid LemaConfig: " + "; ".join(problems))

    @property
    def alpha(self) -> float:
        """LoRA alpha; defaults to twice the rank when not given."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def checkpointing(self) -> bool:
        """Whether layers recompute in backward unless the plan keeps their activations."""
        return self.gradient_checkpointing is not False

    @property
    def offload(self) -> bool | None:
        """``offload_activations`` for the planner: True, False, or None (auto)."""
        return None if self.offload_activations == "auto" else bool(self.offload_activations)

    @property
    def prefetch(self) -> int:
        """The prefetch depth asked for: the number given, else (``"auto"``) 2, which AUTO's
        plan replaces by the depth it chooses (:attr:`prefetch_auto`)."""
        return DEFAULT_PREFETCH if self.prefetch_distance == "auto" else int(self.prefetch_distance)

    @property
    def prefetch_auto(self) -> bool:
        """Whether the plan chooses the prefetch depth (``"auto"`` with ``strategy=AUTO``)."""
        return self.prefetch_distance == "auto" and self.strategy is MemoryStrategy.AUTO

    @property
    def vram_bytes(self) -> int | None:
        return None if self.vram_budget is None else parse_size(self.vram_budget, field="vram_budget")

    @property
    def ram_bytes(self) -> int | None:
        return None if self.ram_budget is None else parse_size(self.ram_budget, field="ram_budget")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (for trainer_state.json)."""
        out = attrs.asdict(self)
        out["strategy"] = self.strategy.value
        out["lora_target_modules"] = list(self.lora_target_modules) if self.lora_target_modules else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LemaConfig":
        """The config :meth:`to_dict` wrote (ConfigError for unknown fields or bad values)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a LemaConfig must be a JSON object of fields, found {type(data).__name__}")
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LemaConfig fields: {', '.join(unknown)}")
        return cls(**data)


def seed_problems(seed: Any, field: str = "seed") -> list[str]:
    """What is wrong with a seed (an integer torch's generators accept), as messages."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return [f"{field}: {seed!r} must be an integer"]
    if not SEED_MIN <= seed <= SEED_MAX:
        return [f"{field}: {seed} is out of range; use an integer from -2**63 to 2**64 - 1"]
    return []


def check_seed(seed: Any, field: str = "seed") -> None:
    """ConfigError unless ``seed`` is an integer torch's generators accept."""
    problems = seed_problems(seed, field)
    if problems:
        raise ConfigError(problems[0])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
