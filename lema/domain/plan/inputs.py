"""The inputs of a memory plan: the run's :class:`TrainingShape` and the :class:`Budget`.

Both are frozen, validated values (change them with ``attrs.evolve``); errors are
``ConfigError`` naming every offending field at once.
"""

from __future__ import annotations

from typing import Any

import attrs

from lema.domain.device_traits import DEVICE_KINDS, DeviceTraits
from lema.domain.model.spec import dtype_code
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.units import parse_size
from lema.errors import ConfigError, ModelFormatError

_POSITIVE = ("batch", "seq", "lora_rank", "head_chunk_tokens", "local_ranks")
_NON_NEGATIVE = ("prefetch", "optimizer_states")
DEFAULT_PREFETCH = 2  # layers read ahead when neither the user nor AUTO's search says otherwise
PREFETCH_DEPTHS = (0, 1, 2, 3, 4)  # the depths AUTO's search tries


def _strategy(value: "str | MemoryStrategy") -> MemoryStrategy:
    return MemoryStrategy.parse(value)


def _targets(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    return tuple(str(v).strip() for v in value)


def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return dtype_code(value)
    except ModelFormatError:
        raise ConfigError(f"dtype: {value!r} is not a dtype; use float32, float16 or bfloat16") from None


@attrs.frozen
class TrainingShape:
    """What the run looks like: the shape of a batch, the adapter, the strategy.

    Attributes:
        batch, seq: sequences per step and tokens per sequence.
        lora_rank, lora_targets: the adapter (targets None = the family's defaults).
        strategy: STREAMING (default), RESIDENT or AUTO.
        prefetch: layers fetched ahead of compute (slots = prefetch + 1).
        prefetch_auto: the planner chooses ``prefetch`` (AUTO: the depth in
            :data:`PREFETCH_DEPTHS` with the smallest predicted step among those that fit,
            :func:`lema.domain.plan.planner.plan`; the plan's shape then holds the depth chosen
            and ``prefetch_auto=False``); another strategy keeps ``prefetch``.
        dtype: compute/storage dtype override (``"bfloat16"``); None keeps the file's.
        gradient_checkpointing: keep only layer inputs and recompute in backward.
        optimizer_states: fp32 states per LoRA parameter (AdamW: 2).
        device_kind: a key of :data:`~lema.domain.device_traits.DEVICE_KINDS` (``"cuda"``, ``"cpu"``):
            the device traits planned for (reserve, pinned staging, optimizer and dequantization).
        attention: ``"flash"`` (no s^2 scores saved) or ``"math"``; None: flash. PyTorch's SDPA
            picks a fused kernel on both kinds: on CPU (torch >= 2.x) ``F.scaled_dot_product_attention``
            runs ``_scaled_dot_product_flash_attention_for_cpu`` for fp32 and bf16, with ``is_causal``
            or a boolean mask (measured: it saves the output and an fp32 log-sum-exp, no
            ``s^2`` tensor); on CUDA bf16/fp16 use flash or memory-efficient attention and
            fp32 the memory-efficient kernel. ``"math"`` plans the unfused path (b H s^2 scores).
        head_chunk_tokens: tokens per chunk of the chunked head.
        reserve_bytes: runtime reserve; None: 512 MiB on cuda, 0 on cpu.
        mode: ``"train"`` or ``"inference"`` (forward only: no grads, optimizer, checkpoints).
        wide_matmul: the frozen weights' products run in fp32 although activations are
            bf16/fp16 (a CPU without fast half precision, see ``lema.domain.nn.matmul``): each
            product briefly holds fp32 copies of its input, weight and output.
        local_ranks: data-parallel ranks on this machine (torchrun ``--nproc-per-node``):
            the device items are per rank (``batch`` is per rank); the host holds one staging
            ring per rank and, with RESIDENT, one copy of the weights shared by all of them.
        offload_activations: move the checkpointed layer inputs to host memory between a
            layer's forward and its backward (True/False); None: the planner decides (on
            when the run does not fit without). Training with checkpointing only.
        tile_tokens: run each layer's token-wise stages over tiles of this many positions
            (0: whole); None: the planner decides (the largest power of two that fits,
            when the run does not fit whole). Training with checkpointing only.
        weights_in_place: the device computes on the weights where the host holds them (the
            CPU training without a budget): no weight slots, no staging, nothing uploaded.
        preference: None (SFT) or a preference step's kind (:data:`lema.domain.plan.preference.KINDS`:
            ``"pairs"``, ``"reference"``, ``"reference_adapter"``); ``batch`` then counts rows,
            two per pair, and the hints speak in pairs.
        kept_layers: with gradient checkpointing, how many decoder layers (the last ones)
            keep their autograd graph from the forward instead of recomputing in the backward
            (0: every layer recomputes, today's checkpointing); None: the planner decides by
            predicted step time within the budget (:mod:`lema.domain.plan.choose`). Without
            checkpointing every layer keeps its graph. With activation offload only the
            recomputing layers' inputs are offloaded (a kept layer has none); not with tiles.
        block_sparse: the batches' attention runs by blocks (packed rows: per example; a
            sliding window shorter than ``seq``: per band; left-padded rows: per row,
            :mod:`lema.domain.nn.attention`), whose concatenated parts hold one more attention
            output ``T q a`` while a layer's attention runs. LEMA's own batches pad on the
            right; a Python API caller whose batches are left-padded sets it.

    Raises:
        ConfigError: naming every field whose value is out of range, at once.
    """

    batch: int = 1
    seq: int = 512
    lora_rank: int = 16
    lora_targets: tuple[str, ...] | None = attrs.field(default=None, converter=_targets)
    strategy: MemoryStrategy = attrs.field(default=MemoryStrategy.STREAMING, converter=_strategy)
    prefetch: int = DEFAULT_PREFETCH
    dtype: str | None = attrs.field(default=None, converter=_dtype)
    gradient_checkpointing: bool = True
    optimizer_states: int = 2
    device_kind: str = "cuda"
    attention: str | None = None
    head_chunk_tokens: int = 1024
    reserve_bytes: int | None = None
    mode: str = "train"
    wide_matmul: bool = False
    local_ranks: int = 1
    offload_activations: bool | None = None
    tile_tokens: int | None = None
    weights_in_place: bool = False
    preference: str | None = None
    kept_layers: int | None = 0
    block_sparse: bool = False
    prefetch_auto: bool = False

    def __attrs_post_init__(self) -> None:
        problems = []

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in _POSITIVE:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                problems.append(f"{name}={value!r} must be an integer >= 0")
        if self.reserve_bytes is not None and (not is_int(self.reserve_bytes) or self.reserve_bytes < 0):
            problems.append(f"reserve_bytes={self.reserve_bytes!r} must be an integer >= 0")
        if self.device_kind not in DEVICE_KINDS:
            problems.append(f"device_kind={self.device_kind!r} must be {' or '.join(map(repr, DEVICE_KINDS))}")
        if self.attention not in (None, "flash", "math"):
            problems.append(f"attention={self.attention!r} must be 'flash' or 'math'")
        if self.mode not in ("train", "inference"):
            problems.append(f"mode={self.mode!r} must be 'train' or 'inference'")
        if self.lora_targets is not None and (not self.lora_targets or not all(self.lora_targets)):
            problems.append(f"lora_targets={self.lora_targets!r} must be non-empty module names")
        if self.offload_activations not in (None, True, False):
            problems.append(f"offload_activations={self.offload_activations!r} must be True, False or None (auto)")
        elif self.offload_activations and not (self.mode == "train" and self.gradient_checkpointing):
            problems.append("offload_activations=True moves checkpointed layer inputs: it needs mode='train' "
                            "with gradient checkpointing")
        if self.tile_tokens is not None and (not is_int(self.tile_tokens) or self.tile_tokens < 0):
            problems.append(f"tile_tokens={self.tile_tokens!r} must be an integer >= 0 (0: no tiling) or None (auto)")
        elif self.tile_tokens and not (self.mode == "train" and self.gradient_checkpointing):
            problems.append("tile_tokens: sequence tiling recomputes each layer: it needs mode='train' "
                            "with gradient checkpointing")
        if self.preference not in (None, "pairs", "reference", "reference_adapter"):
            problems.append(f"preference={self.preference!r} must be None, 'pairs', 'reference' or "
                            "'reference_adapter'")
        elif self.preference is not None and is_int(self.batch) and self.batch % 2:
            problems.append(f"batch={self.batch!r} counts the rows of pairs: it must be even with a preference")
        if self.kept_layers is not None and (not is_int(self.kept_layers) or self.kept_layers < 0):
            problems.append(f"kept_layers={self.kept_layers!r} must be an integer >= 0 or None (auto)")
        elif self.kept_layers and self.tile_tokens:
            problems.append("kept_layers: layers that keep their activations are not tiled (a kept layer's graph "
                            "holds every tile's tensors); use tile_tokens=0 (or leave it to the planner)")
        if problems:
            raise ConfigError("training shape: " + "; ".join(problems))

    @property
    def attention_path(self) -> str:
        """``"flash"`` or ``"math"``: the attention the working set assumes."""
        return self.attention or "flash"

    @property
    def reserve(self) -> int:
        """The runtime reserve in bytes."""
        if self.reserve_bytes is not None:
            return self.reserve_bytes
        return self.device.runtime_reserve

    @property
    def device(self) -> DeviceTraits:
        """The traits of the device kind planned for (:mod:`lema.domain.device_traits`)."""
        return DEVICE_KINDS[self.device_kind]

    @property
    def training(self) -> bool:
        return self.mode == "train"

    @property
    def offloads(self) -> bool:
        """The checkpointed layer inputs go to host memory (False while undecided: None)."""
        return bool(self.offload_activations) and self.training and self.gradient_checkpointing

    def kept(self, n_layers: int) -> int:
        """Decoder layers (the last ones) that keep their graph: all without checkpointing,
        ``kept_layers`` (at most ``n_layers``; 0 while undecided) with it, none in inference."""
        if not self.training:
            return 0
        if not self.gradient_checkpointing:
            return n_layers
        return min(self.kept_layers or 0, n_layers)

    @property
    def tile(self) -> int:
        """Positions per sequence tile of each layer; 0: the layers run whole (or undecided)."""
        tile = self.tile_tokens or 0
        return tile if 0 < tile < self.seq and self.training and self.gradient_checkpointing else 0


@attrs.frozen
class Budget:
    """Memory available: device bytes, and optionally host RAM bytes."""

    device_bytes: int
    host_bytes: int | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes"):
            value = getattr(self, name)
            if value is None and name == "host_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"budget: {name}={value!r} must be a positive number of bytes")

    @classmethod
    def from_strings(cls, device: str, host: str | None = None) -> "Budget":
        """``Budget.from_strings("8G", "32G")``; errors name ``--vram`` / ``--ram``."""
        return cls(parse_size(device, field="--vram"), None if host is None else parse_size(host, field="--ram"))
