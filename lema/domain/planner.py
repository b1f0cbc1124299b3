"""The memory planner: how many bytes a LoRA run needs on the device, the host and the link.

Pure arithmetic over a :class:`~lema.domain.spec.ModelSpec` and a :class:`TrainingShape`
(DESIGN.md section 4). The plan itemises the device and host bytes, gives a verdict
against a :class:`Budget` with the headroom, counts the bytes moved host -> device per
step, and says what would make it fit (:mod:`lema.domain.recommend`). Sizes are integer
bytes; formatting happens at the edge.

The device model (what the engine allocates, in this order of size for big models):
units ``1..L+1`` (decoder layers and the head) are streamed through ``min(prefetch + 1,
n_streamed)`` slots of the largest streamed unit, unless kept resident (AUTO keeps as many
decoder layers as fit, from layer 0 upward, then the head). The embedding is gathered on
the host and only its output is uploaded. LoRA parameters, gradients and AdamW states are
fp32. With gradient checkpointing each layer's input is kept. The step's transient phases
(the forward, the head's chunked loss + backward, one layer's recompute + backward, the
optimizer step) run one after another, so the device total is the persistent items plus
``activation_peak``, the largest phase (:func:`activation_phases`), not their sum.

Example:
    >>> from lema.domain.spec import ModelSpec
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
    >>> p = plan(ModelSpec.from_config(cfg, dtype="F32"), TrainingShape(seq=32), Budget(2**30))
    >>> p.fits, p.slot_count
    (True, 3)
"""

from __future__ import annotations

from typing import Any

import attrs

from lema.domain import plan_items as pi
from lema.domain.plan_inputs import Budget, TrainingShape
from lema.domain.plan_items import MemoryItem, ModelFacts
from lema.domain.spec import ModelSpec
from lema.domain.strategy import MemoryStrategy
from lema.domain.units import format_size
from lema.errors import ConfigError

__all__ = ["Budget", "MemoryItem", "MemoryPlan", "ModelSummary", "TrainingShape", "max_resident_layers", "plan"]

@attrs.frozen
class ModelSummary:
    """The model numbers a plan reports (bytes at the planned dtype)."""

    family: str
    model_type: str
    n_layers: int
    hidden_size: int
    max_positions: int
    parameters: int
    weight_bytes: int
    largest_layer_bytes: int
    head_bytes: int
    dtype: str
    file_dtype: str
    lora_parameters: int
    lora_targets: tuple[str, ...]


def _sum(items: tuple[MemoryItem, ...]) -> int:
    return sum(i.bytes for i in items)


@attrs.frozen
class MemoryPlan:
    """An itemised memory plan and its verdict (see the module docstring)."""

    model: ModelSummary
    shape: TrainingShape
    budget: Budget | None
    device_items: tuple[MemoryItem, ...]
    host_items: tuple[MemoryItem, ...]
    resident_units: tuple[int, ...]
    streamed_units: tuple[int, ...]
    slot_count: int
    slot_bytes: int
    transfer_bytes_per_step: int
    recommendations: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()  # CLI options that each make it fit, e.g. "--seq 256"

    @property
    def device_total(self) -> int:
        return _sum(self.device_items)

    @property
    def host_total(self) -> int:
        return _sum(self.host_items)

    @property
    def device_fits(self) -> bool:
        return self.budget is None or self.device_total <= self.budget.device_bytes

    @property
    def host_fits(self) -> bool:
        return self.budget is None or self.budget.host_bytes is None or self.host_total <= self.budget.host_bytes

    @property
    def fits(self) -> bool:
        """True when the device total (and the host total, if a host budget is set) fit."""
        return self.device_fits and self.host_fits

    @property
    def headroom_bytes(self) -> int | None:
        """Device budget minus device total (negative: short by); None without a budget."""
        return None if self.budget is None else self.budget.device_bytes - self.device_total

    def item(self, name: str) -> MemoryItem:
        """The device or host item called ``name``."""
        for i in self.device_items + self.host_items:
            if i.name == name:
                return i
        raise KeyError(name)

    def link_time_floor(self, bandwidth_bytes_per_s: float) -> float:
        """Seconds per step the host -> device link needs at this bandwidth (a lower bound)."""
        if not bandwidth_bytes_per_s > 0:
            raise ConfigError(f"bandwidth: {bandwidth_bytes_per_s!r} must be positive")
        return self.transfer_bytes_per_step / bandwidth_bytes_per_s

    def verdict(self) -> str:
        """One line: ``FITS: ...`` or ``DOES NOT FIT: ...; would fit with ...``."""
        from lema.domain.recommend import verdict

        return verdict(self)

    def explain(self) -> str:
        """A multi-line human explanation: model, shape, items, verdict, what would fit."""
        from lema.domain.recommend import explain

        return explain(self)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict ``lema plan --json`` prints."""
        m, s = self.model, self.shape
        return {
            "model": attrs.asdict(m, recurse=False) | {"lora_targets": list(m.lora_targets)},
            "shape": {"batch": s.batch, "seq": s.seq, "lora_rank": s.lora_rank, "lora_targets": list(m.lora_targets),
                      "strategy": s.strategy.value, "prefetch": s.prefetch, "dtype": m.dtype,
                      "gradient_checkpointing": s.gradient_checkpointing, "optimizer_states": s.optimizer_states,
                      "device_kind": s.device_kind, "attention": s.attention_path,
                      "head_chunk_tokens": s.head_chunk_tokens, "reserve_bytes": s.reserve, "mode": s.mode},
            "device": {"total_bytes": self.device_total, "items": [i.to_dict() for i in self.device_items]},
            "host": {"total_bytes": self.host_total, "items": [i.to_dict() for i in self.host_items]},
            "budget_bytes": None if self.budget is None else self.budget.device_bytes,
            "host_budget_bytes": None if self.budget is None else self.budget.host_bytes,
            "fits": self.fits, "device_fits": self.device_fits, "host_fits": self.host_fits,
            "headroom_bytes": self.headroom_bytes,
            "resident_units": list(self.resident_units), "streamed_units": list(self.streamed_units),
            "slot_count": self.slot_count, "slot_bytes": self.slot_bytes,
            "transfer_bytes_per_step": self.transfer_bytes_per_step,
            "recommendations": list(self.recommendations), "fixes": list(self.fixes),
        }


def facts_for(spec: ModelSpec, shape: TrainingShape) -> ModelFacts:
    """The model numbers a plan of this shape needs (validates the LoRA targets)."""
    # lema.domain.lora imports torch; importing it here keeps `lema plan`'s start-up light
    # for callers that never plan.
    from lema.domain import lora

    targets = lora.resolve_targets(spec.family, shape.lora_targets)
    keys = lora.module_keys(spec, targets)
    return pi.model_facts(spec, shape.dtype, targets, [lora.module_shape(spec, k) for k in keys], keys)


def _summary(spec: ModelSpec, shape: TrainingShape, f: ModelFacts) -> ModelSummary:
    weight = f.embed_only_bytes + f.streamed_bytes
    return ModelSummary(
        family=spec.family, model_type=spec.model_type, n_layers=spec.n_layers, hidden_size=spec.hidden_size,
        max_positions=spec.max_positions, parameters=spec.parameters, weight_bytes=weight,
        largest_layer_bytes=max(f.unit_bytes[1:-1]),
        head_bytes=f.unit_bytes[-1], dtype=shape.dtype or spec.dtype, file_dtype=spec.dtype,
        lora_parameters=pi.lora_parameters(f, shape.lora_rank), lora_targets=f.targets,
    )


def build(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None,
          resident: tuple[int, ...]) -> MemoryPlan:
    """The plan with exactly these units (indices ``1..L+1``) resident; no recommendations."""
    n = f.n_layers
    streamed = tuple(i for i in range(1, n + 2) if i not in resident)
    slot_count = min(shape.prefetch + 1, len(streamed))
    slot_bytes = max((f.unit_buffer_bytes[i] for i in streamed), default=0)
    device = [
        MemoryItem("resident_weights", sum(f.unit_buffer_bytes[i] for i in resident),
                   f"{len(resident)} units kept on the device"),
        MemoryItem("weight_slots", slot_count * slot_bytes,
                   f"{slot_count} slots x {format_size(slot_bytes)} (prefetch {shape.prefetch} + 1)"),
    ]
    device += persistent_items(summary, f, shape)
    device.append(activation_peak(f, shape))
    device.append(MemoryItem("runtime_reserve", shape.reserve,
                             "CUDA context + allocator slack" if shape.device_kind == "cuda" else ""))

    resident_strategy = shape.strategy is MemoryStrategy.RESIDENT
    host = [
        MemoryItem("staging_buffers", 0 if resident_strategy else slot_count * slot_bytes,
                   "" if resident_strategy else
                   f"{slot_count} x {format_size(slot_bytes)}" + (", pinned" if shape.device_kind == "cuda" else "")),
        MemoryItem("resident_weights_host", f.streamed_bytes if resident_strategy else 0,
                   "decoder layers + head in RAM" if resident_strategy else "read from the mmap'd file"),
        MemoryItem("embedding", f.embed_only_bytes if resident_strategy else 0,
                   "in RAM" if resident_strategy else "rows gathered from the mmap'd file"),
    ]

    decoders = [i for i in streamed if i <= n]
    transfer = sum(f.unit_bytes[i] for i in streamed)
    if shape.training:
        # The last fetched units (head + the last `prefetch` decoders) are still in their
        # slots at the turn, so backward re-fetches only the other streamed decoders.
        kept = slot_count - (1 if (n + 1) in streamed else 0)
        transfer += sum(f.unit_bytes[i] for i in decoders[:len(decoders) - max(kept, 0)])
    return MemoryPlan(model=summary, shape=shape, budget=budget, device_items=tuple(device), host_items=tuple(host),
                      resident_units=resident, streamed_units=streamed, slot_count=slot_count, slot_bytes=slot_bytes,
                      transfer_bytes_per_step=transfer)


def persistent_items(summary: ModelSummary, f: ModelFacts, shape: TrainingShape) -> list[MemoryItem]:
    """Device bytes alive through the whole step besides the weights: LoRA parameters,
    optimizer states (training), the batch context, and a cast copy of one unit when the
    compute dtype differs from the file's."""
    lora = pi.lora_parameters(f, shape.lora_rank)
    items = [MemoryItem("lora_params", lora * pi.FP32, f"{lora:,} fp32 parameters")]
    if shape.training:
        items.append(MemoryItem("optimizer_states", lora * pi.FP32 * shape.optimizer_states,
                                f"{shape.optimizer_states} fp32 states per parameter (AdamW)"))
    items.append(pi.batch_context(f, shape.batch, shape.seq, shape.training))
    if shape.dtype is not None and shape.dtype != summary.file_dtype:
        items.append(MemoryItem("weight_cast", max(f.unit_bytes[1:]),
                                f"the computing unit cast from {summary.file_dtype} to {shape.dtype}"))
    return items


def activation_phases(f: ModelFacts, shape: TrainingShape) -> list[MemoryItem]:
    """The step's transient phases, which never coexist (see :func:`activation_peak`).

    Training with checkpointing (``X = T h a`` one hidden state, ``G`` one layer's fp32
    LoRA gradients; gradients are created by the backward and freed by ``zero_grad``):

    * ``forward``: the ``L`` layer inputs kept, one layer's no-grad forward;
    * ``head``: the ``L`` inputs, ``x_L``, the chunked loss + backward;
    * ``layer_backward``: at unit ``u`` the inputs of units ``1..u`` and the gradients of
      units ``u..L`` (the larger end: ``L X + G`` or ``X + L G``), the incoming gradient,
      one layer's recompute + backward;
    * ``optimizer_step``: every gradient plus the optimizer's temporaries (CUDA foreach:
      one parameter-sized copy of all; CPU: two of the largest tensor).

    Inference (``LemaModel.forward``): ``forward`` (the embedding output, the hidden state,
    one layer) and ``head`` (the same two + the full float32 logits it returns).
    """
    b, s, n, attention = shape.batch, shape.seq, f.n_layers, shape.attention_path
    x = b * s * f.hidden * f.act_bytes
    wide = shape.wide_matmul and f.act_bytes != pi.FP32
    # Measured on CpuDevice: a layer's wide products peak below the layer's own peak (their
    # fp32 temporaries live while little else does), so only the head's count.
    layer_wide: list[MemoryItem] = []
    head_wide = [pi.wide_matmul_head(f, b, s, shape.head_chunk_tokens)] if wide else []
    if not shape.training:
        # LemaModel.forward keeps the embedding output (a local) besides the current hidden state.
        states = [MemoryItem("embedding_output", x, "T h a"), MemoryItem("hidden_state", x, "T h a")]
        return [pi.summed("forward", states + [pi.layer_forward(f, b, s, attention)] + layer_wide),
                pi.summed("head", states + [pi.head_inference(f, b, s)] + head_wide)]
    lora = pi.lora_parameters(f, shape.lora_rank)
    grads = lora * pi.FP32
    g = grads // max(n, 1)
    if shape.optimizer_states == 0:
        opt_temp = 0
    elif shape.device_kind == "cuda":
        opt_temp = grads
    else:
        opt_temp = 2 * shape.lora_rank * max((max(i, o) for i, o in f.lora_modules), default=0) * pi.FP32
    optimizer = pi.summed("optimizer_step", [MemoryItem("lora_grads", grads, "fp32"),
                                              MemoryItem("optimizer_temporaries", opt_temp,
                                                         "foreach: one copy" if shape.device_kind == "cuda"
                                                         else "two copies of the largest tensor")])
    if shape.gradient_checkpointing:
        if n * x + g >= x + n * g:
            kept = [MemoryItem("checkpointed_inputs", n * x, f"{n} layers x T h a"),
                    MemoryItem("lora_grads", g, "the last layer's")]
        else:
            kept = [MemoryItem("checkpointed_inputs", x, "the first layer's"),
                    MemoryItem("lora_grads", n * g, f"{n} layers, fp32")]
        inputs = MemoryItem("checkpointed_inputs", n * x, f"{n} layers x T h a")
        return [
            pi.summed("forward", [inputs, pi.layer_forward(f, b, s, attention)] + layer_wide),
            pi.summed("head", [inputs, MemoryItem("hidden_state", x, "x_L: T h a"),
                               pi.head_train(f, b, s, shape.head_chunk_tokens)] + head_wide),
            pi.summed("layer_backward", kept + [pi.layer_recompute(f, b, s, shape.lora_rank, attention)]
                      + layer_wide),
            optimizer,
        ]
    m = pi.layer_model(f, b, s, shape.lora_rank, attention)
    per_layer = x + sum(i.bytes for i in m.saved)
    stored = MemoryItem("stored_activations", n * per_layer,
                        f"{n} layers x {format_size(per_layer)} (input + saved), no checkpointing")
    return [
        pi.summed("head", [stored, MemoryItem("hidden_state", x, "x_L: T h a"),
                           pi.head_train(f, b, s, shape.head_chunk_tokens)] + head_wide),
        pi.summed("layer_backward", [stored, MemoryItem("lora_grads", grads, "fp32"),
                                     MemoryItem("temporaries", m.backward_extra, "output, gradients")]
                  + layer_wide),
        optimizer,
    ]


def activation_peak(f: ModelFacts, shape: TrainingShape) -> MemoryItem:
    """The largest transient phase: the head, a layer's backward, the forward and the
    optimizer step run one after another, so the device holds only the largest of them on
    top of the persistent items (its ``parts`` are every phase)."""
    return pi.peak_of("activation_peak", activation_phases(f, shape), "the largest phase")


def _resident_prefix(n_layers: int, k: int) -> tuple[int, ...]:
    # AUTO keeps decoder layers from the first upward (they are the ones fetched twice),
    # then the head once every decoder layer is resident.
    return tuple(range(1, k + 1))


def auto_resident(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None
                  ) -> tuple[int, ...]:
    """AUTO's resident units: the most units (layer 0 upward, then the head) that fit."""
    n = f.n_layers
    if budget is None:
        return _resident_prefix(n, n + 1)
    best = 0
    # Not monotone near the end (fewer streamed units need fewer slots), so scan them all.
    for k in range(n + 2):
        if build(summary, f, shape, budget, _resident_prefix(n, k)).fits:
            best = k
    return _resident_prefix(n, best)


def plan(spec: ModelSpec, shape: TrainingShape | None = None, budget: Budget | None = None) -> MemoryPlan:
    """Plan a LoRA run of ``spec`` with ``shape`` against ``budget``.

    Args:
        spec: the model.
        shape: the run (default: :class:`TrainingShape` defaults).
        budget: the memory available; None = unlimited (the plan fits, no recommendations).

    Returns:
        The itemised :class:`MemoryPlan` with a verdict and recommendations.

    Raises:
        ConfigError: when the LoRA targets match no module of the family.
    """
    shape = TrainingShape() if shape is None else shape
    f = facts_for(spec, shape)
    summary = _summary(spec, shape, f)
    result = _plan_with(summary, f, shape, budget)
    if budget is None:
        return result
    from lema.domain.recommend import recommendations

    def facts_at(code: str) -> ModelFacts:
        return pi.model_facts(spec, code, f.targets, f.lora_modules, f.lora_keys)

    recs, fixes = recommendations(summary, f, result, facts_at)
    return attrs.evolve(result, recommendations=recs, fixes=fixes)


def _plan_with(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None) -> MemoryPlan:
    if shape.strategy is MemoryStrategy.AUTO:
        resident = auto_resident(summary, f, shape, budget)
    else:
        resident = ()
    return build(summary, f, shape, budget, resident)


def max_resident_layers(spec: ModelSpec, shape: TrainingShape | None = None, budget: Budget | None = None) -> int:
    """How many decoder layers AUTO keeps on the device at this budget (0..n_layers)."""
    shape = TrainingShape() if shape is None else shape
    f = facts_for(spec, shape)
    resident = auto_resident(_summary(spec, shape, f), f, shape, budget)
    return sum(1 for i in resident if i <= spec.n_layers)
