"""Assembling a plan: the model facts a shape needs, the device and host items, AUTO residency,
and the activation choices (offload, tiles) when the shape leaves them to the planner (pure).

See :mod:`lema.domain.plan.planner` for the device model these items follow.
"""

from __future__ import annotations

from typing import Callable

import attrs

from lema.domain.model.spec import ModelSpec
from lema.domain.plan import items as pi
from lema.domain.plan import preference, stages
from lema.domain.plan.inputs import Budget, TrainingShape
from lema.domain.plan.items import MemoryItem, ModelFacts
from lema.domain.plan.memory_plan import MemoryPlan, ModelSummary
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.schedule.layer_schedule import kept_inputs
from lema.domain.units import format_size


def facts_for(spec: ModelSpec, shape: TrainingShape) -> ModelFacts:
    """The model numbers a plan of this shape needs (validates the LoRA targets)."""
    # lema.domain.model.lora imports torch; importing it here keeps `lema plan`'s start-up light
    # for callers that never plan.
    from lema.domain.model import lora

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
        quantization=f.quantization,
    )


def build(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None,
          resident: tuple[int, ...]) -> MemoryPlan:
    """The plan with exactly these units (indices ``1..L+1``) resident; no recommendations."""
    n = f.n_layers
    kept = set(resident)  # a set: this runs for every candidate of AUTO's search
    streamed = tuple(i for i in range(1, n + 2) if i not in kept)
    slot_count = min(shape.prefetch + 1, len(streamed))
    slot_bytes = max((f.unit_buffer_bytes[i] for i in streamed), default=0)
    in_place = shape.weights_in_place and not f.quantization
    in_place_note = "read in place: the device's memory is the host's"
    device = [
        MemoryItem("resident_weights", 0 if in_place else sum(f.unit_buffer_bytes[i] for i in resident),
                   in_place_note if in_place else f"{len(resident)} units kept on the device"),
        MemoryItem("weight_slots", 0 if in_place else slot_count * slot_bytes,
                   in_place_note if in_place else
                   f"{slot_count} slots x {format_size(slot_bytes)} (prefetch {shape.prefetch} + 1)"
                   + (f", {f.quantization} packed" if f.quantization else "")),
    ]
    scratch = max(f.dequant_bytes[1:], default=0)
    if scratch:
        device.append(MemoryItem("dequant_scratch", scratch,
                                 f"the computing layer's packed weights dequantized to {summary.dtype}"))
    device += persistent_items(summary, f, shape)
    device.append(activation_peak(f, shape))
    device.append(MemoryItem("runtime_reserve", shape.reserve,
                             "CUDA context + allocator slack" if shape.device.runtime_reserve else ""))

    resident_strategy = shape.strategy is MemoryStrategy.RESIDENT
    ranks = shape.local_ranks
    per_rank = f"{ranks} ranks x " if ranks > 1 else ""
    shared = f", one copy shared by {ranks} ranks (page cache)" if ranks > 1 else ""
    staging = slot_count + (1 if shape.device.spare_staging else 0)  # (a spare one: reads never wait for an upload)
    host = [
        MemoryItem("staging_buffers", 0 if resident_strategy or in_place else ranks * staging * slot_bytes,
                   "" if resident_strategy or in_place else
                   f"{per_rank}{staging} x {format_size(slot_bytes)}"
                   + (", pinned" if shape.device.pinned_host else "")),
        MemoryItem("resident_weights_host", f.streamed_bytes if resident_strategy else 0,
                   f"decoder layers + head in RAM{shared}" if resident_strategy else "read from the mmap'd file"),
        MemoryItem("embedding", f.embed_only_bytes if resident_strategy else 0,
                   f"in RAM{shared}" if resident_strategy else "rows gathered from the mmap'd file"),
    ]
    offloaded = offloaded_inputs(f, shape)
    if offloaded:
        x = shape.batch * shape.seq * f.hidden * f.act_bytes
        host.append(MemoryItem("offloaded_inputs", offloaded * x,
                               f"{offloaded} layer inputs x T h a" + (", pinned" if shape.device.pinned_host else "")))

    decoders = [i for i in streamed if i <= n]
    transfer = 0 if in_place else sum(f.unit_bytes[i] for i in streamed)
    if shape.training and not in_place:
        # The last fetched units (head + the last `prefetch` decoders) are still in their
        # slots at the turn, so backward re-fetches only the other streamed decoders.
        at_turn = slot_count - (1 if (n + 1) in streamed else 0)
        transfer += sum(f.unit_bytes[i] for i in decoders[:len(decoders) - max(at_turn, 0)])
    return MemoryPlan(model=summary, shape=shape, budget=budget, device_items=tuple(device), host_items=tuple(host),
                      resident_units=resident, streamed_units=streamed, slot_count=slot_count, slot_bytes=slot_bytes,
                      transfer_bytes_per_step=transfer,
                      activation_bytes_per_step=offloaded * shape.batch * shape.seq * f.hidden * f.act_bytes)


def offloaded_inputs(f: ModelFacts, shape: TrainingShape) -> int:
    """How many layer inputs leave the device each step: of the ``c`` recomputing layers' (the
    layers that keep their activations have none), all but the ``kept_inputs(c)`` whose
    backward comes first."""
    c = f.n_layers - shape.kept(f.n_layers)
    return c - kept_inputs(c, shape.prefetch) if shape.offloads else 0


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
        items.append(MemoryItem("weight_cast", max(f.castable_bytes[1:] or f.unit_bytes[1:]),
                                f"the computing unit's dense tensors cast from {summary.file_dtype} to {shape.dtype}"))
    return items + preference.persistent(f, shape.lora_rank, shape.preference)


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

    With activation offload only ``k`` inputs are on the device at a time instead of ``L``
    (the kept ones, :func:`~lema.domain.schedule.layer_schedule.kept_inputs`: the current
    input and the one fetched ahead); on CUDA the forward also holds the previous input
    until its copy to the host is done. With tiling, a layer's forward and recompute +
    backward are :mod:`lema.domain.plan.stages`' tiled items.

    Inference (``LemaModel.forward``): ``forward`` (the embedding output, the hidden state,
    one layer) and ``head`` (the same two + the full float32 logits it returns).

    A quantized model adds ``dequantize``: before a layer computes, its packed weights are
    dequantized into the scratch buffer (a persistent item) with the temporaries of
    :func:`lema.domain.plan.items.dequant_temporaries`, while the step's kept tensors live.
    """
    b, s, n, attention = shape.batch, shape.seq, f.n_layers, shape.attention_path
    x = b * s * f.hidden * f.act_bytes
    temp = f.dequant_temp[1 if shape.device.dequantizes_in_place else 0]
    dequant = MemoryItem("dequant_temporaries", temp, "dequantizing the largest packed weight")
    wide = shape.wide_matmul and f.act_bytes != pi.FP32
    # Measured on CpuDevice: a layer's wide products peak below the layer's own peak (their
    # fp32 temporaries live while little else does), so only the head's count.
    layer_wide: list[MemoryItem] = []
    head_wide = [pi.wide_matmul_head(f, b, s, shape.head_chunk_tokens)] if wide else []
    if not shape.training:
        # LemaModel.forward keeps the embedding output (a local) besides the current hidden state.
        states = [MemoryItem("embedding_output", x, "T h a"), MemoryItem("hidden_state", x, "T h a")]
        blocks = [stages.block_sparse_attention(f, b, s)] if shape.block_sparse else []
        phases = [pi.summed("forward", states + [pi.layer_forward(f, b, s, attention)] + blocks + layer_wide),
                  pi.summed("head", states + [pi.head_inference(f, b, s)] + head_wide)]
        return phases + ([pi.summed("dequantize", states + [dequant])] if temp else [])
    lora = pi.lora_parameters(f, shape.lora_rank)
    grads = lora * pi.FP32
    g = grads // max(n, 1)
    if shape.optimizer_states == 0:
        opt_temp = 0
    elif shape.device.foreach_optimizer:
        opt_temp = grads
    else:
        opt_temp = 2 * shape.lora_rank * max((max(i, o) for i, o in f.lora_modules), default=0) * pi.FP32
    optimizer = pi.summed("optimizer_step", [MemoryItem("lora_grads", grads, "fp32"),
                                              MemoryItem("optimizer_temporaries", opt_temp,
                                                         "foreach: one copy" if shape.device.foreach_optimizer
                                                         else "two copies of the largest tensor")])
    held = shape.kept(n)  # the last `held` layers keep their graph (no recompute)
    if held < n:
        c = n - held  # the layers that recompute
        k = kept_inputs(c, shape.prefetch) if shape.offloads else c
        where = f"{k} of {n} layers on the device" if k < n else f"{n} layers"
        # At backward position p (unit L - p) the device holds min(k, L - p) inputs and the
        # gradients of p + 1 layers: the larger end is p = L - k or p = L - 1.
        if k * x + (n - k + 1) * g >= x + n * g:
            kept = [MemoryItem("checkpointed_inputs", k * x, f"{where} x T h a"),
                    MemoryItem("lora_grads", (n - k + 1) * g, f"{n - k + 1} layers, fp32")]
        else:
            kept = [MemoryItem("checkpointed_inputs", x, "the first layer's"),
                    MemoryItem("lora_grads", n * g, f"{n} layers, fp32")]
        inputs = MemoryItem("checkpointed_inputs", k * x, f"{where} x T h a")
        forward_inputs = inputs
        if k < c and shape.device.pinned_host and k < 2:
            forward_inputs = MemoryItem("checkpointed_inputs", 2 * x, "the current input + the previous one, "
                                                                      "until its copy to the host is done")
        tile = shape.tile
        if tile:
            layer = stages.tiled_forward(f, b, s, tile, attention)
            recompute = stages.tiled_backward(f, b, s, tile, shape.lora_rank, attention)
        else:
            layer = pi.layer_forward(f, b, s, attention)
            recompute = pi.layer_recompute(f, b, s, shape.lora_rank, attention)
        if shape.block_sparse:  # packed rows or a window shorter than the sequence
            per_block = stages.block_sparse_attention(f, b, s)
            layer = pi.summed(layer.name, [layer, per_block], layer.note)
            recompute = pi.summed(recompute.name, [recompute, per_block], recompute.note)
        held_items: list[MemoryItem] = []
        held_phases: list[MemoryItem] = []
        if held:
            m = pi.layer_model(f, b, s, shape.lora_rank, attention)
            per_layer = x + sum(i.bytes for i in m.saved)
            stored = MemoryItem("stored_activations", held * per_layer,
                                f"the last {held} layers x {format_size(per_layer)} (input + saved), no recompute")
            held_items = [stored]
            held_phases = [
                pi.summed("kept_forward", [inputs, stored, MemoryItem("temporaries", m.forward_extra,
                                                                      "the last kept layer's forward")]),
                pi.summed("kept_backward", [inputs, stored, MemoryItem("lora_grads", held * g, f"{held} layers, fp32"),
                                            MemoryItem("temporaries", m.backward_extra, "output, gradients")]
                          + layer_wide),
            ]
        dequantize = [pi.summed("dequantize", kept + held_items + [MemoryItem("gradient", x, "incoming: T h a"),
                                                                   dequant])] if temp else []
        return [
            pi.summed("forward", [forward_inputs, layer] + layer_wide),
            pi.summed("head", [inputs] + held_items + [MemoryItem("hidden_state", x, "x_L: T h a"),
                                                       pi.head_train(f, b, s, shape.head_chunk_tokens)] + head_wide),
            *held_phases,
            pi.summed("layer_backward", kept + [recompute] + layer_wide),
            optimizer,
        ] + dequantize
    m = pi.layer_model(f, b, s, shape.lora_rank, attention)
    per_layer = x + sum(i.bytes for i in m.saved)
    stored = MemoryItem("stored_activations", n * per_layer,
                        f"{n} layers x {format_size(per_layer)} (input + saved), "
                        + ("no checkpointing" if not shape.gradient_checkpointing else "no recompute"))
    dequantize = [pi.summed("dequantize", [stored, MemoryItem("gradient", x, "incoming: T h a"), dequant])] \
        if temp else []
    return [
        pi.summed("head", [stored, MemoryItem("hidden_state", x, "x_L: T h a"),
                           pi.head_train(f, b, s, shape.head_chunk_tokens)] + head_wide),
        pi.summed("layer_backward", [stored, MemoryItem("lora_grads", grads, "fp32"),
                                     MemoryItem("temporaries", m.backward_extra, "output, gradients")]
                  + layer_wide),
        optimizer,
    ] + dequantize


def activation_peak(f: ModelFacts, shape: TrainingShape) -> MemoryItem:
    """The largest transient phase: the head, a layer's backward, the forward and the
    optimizer step run one after another, so the device holds only the largest of them on
    top of the persistent items (its ``parts`` are every phase)."""
    phases = preference.phases(f, shape.batch, shape.seq, shape.head_chunk_tokens, shape.preference,
                               activation_phases(f, shape))
    return pi.peak_of("activation_peak", phases, "the largest phase")


def _resident_prefix(n_layers: int, k: int) -> tuple[int, ...]:
    # AUTO keeps decoder layers from the first upward (they are the ones fetched twice),
    # then the head once every decoder layer is resident.
    return tuple(range(1, k + 1))


def auto_resident(summary: ModelSummary, f: ModelFacts, shape: TrainingShape, budget: Budget | None
                  ) -> tuple[int, ...]:
    """AUTO's resident units: the most units (layer 0 upward, then the head) that fit.

    While the head and at least ``prefetch + 1`` units are streamed, keeping one more
    (alike) decoder layer resident changes only the resident bytes, so "it fits" turns
    false once and stays false: a binary search finds the largest such count in
    ``O(log L)`` plans, and only the last few counts (fewer slots, or the head resident)
    are tried one by one. Layers of different sizes fall back to trying every count.
    """
    n = f.n_layers
    if budget is None:
        return _resident_prefix(n, n + 1)

    def fits(k: int) -> bool:
        return build(summary, f, shape, budget, _resident_prefix(n, k)).fits

    alike = len(set(f.unit_buffer_bytes[1:n + 1])) <= 1
    stable = max(0, min(n - 1, n - shape.prefetch)) if alike else -1
    return _resident_prefix(n, largest_fitting(fits, stable, n + 1))


def largest_fitting(fits: Callable[[int], bool], stable: int, last: int) -> int:
    """The largest ``k`` in ``0..last`` with ``fits(k)`` (0 when none): a binary search over
    ``0..stable``, where ``fits`` is monotonic (-1: nowhere), then each ``k`` beyond it."""
    best = 0
    if stable >= 0 and fits(0):
        low, high = 0, stable  # fits(low) holds
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        best = low
    for k in range(stable + 1, last + 1):
        if fits(k):
            best = k
    return best


MIN_TILE = 128  # positions: below this a tile's products are too small to keep the device busy


def tile_candidates(seq: int) -> list[int]:
    """Tile sizes the planner considers: the powers of two below ``seq``, largest first,
    down to :data:`MIN_TILE`."""
    out, tile = [], 1 << max((seq - 1).bit_length() - 1, 0)
    while tile >= MIN_TILE:
        out.append(tile)
        tile //= 2
    return out


def tiles_planned(f: ModelFacts) -> bool:
    """Whether the planner chooses tiles for this model by itself: the tiled working set
    (:mod:`.stages`) is measured for dense layers without the newer families' extra terms;
    routed experts, eager soft-capped scores, fused projections and post-norms are not
    (a forced ``tile_tokens`` is still planned, with the dense formulas)."""
    return not (f.experts or f.eager_scores or f.fused_qkv or f.post_norm_width)


def activation_options(shape: TrainingShape, f: ModelFacts | None = None) -> list[TrainingShape]:
    """The resolved shapes a shape allows, in the planner's order of preference: whole
    layers before tiles (larger first), and for each, inputs kept on the device before
    offloaded (offload costs link time; tiling recomputes the projections)."""
    if not (shape.training and shape.gradient_checkpointing):
        return [attrs.evolve(shape, offload_activations=bool(shape.offload_activations), tile_tokens=0)]
    offloads = [False, True] if shape.offload_activations is None else [shape.offload_activations]
    if shape.kept_layers:  # kept layers are not tiled (the recomputing ones' inputs may be offloaded)
        return [attrs.evolve(shape, offload_activations=o, tile_tokens=0) for o in offloads]
    auto = [0, *tile_candidates(shape.seq)] if f is None or tiles_planned(f) else [0]
    tiles = auto if shape.tile_tokens is None else [shape.tile_tokens]
    return [attrs.evolve(shape, offload_activations=o, tile_tokens=t) for t in tiles for o in offloads]


def resolve_activations(summary: ModelSummary, f: ModelFacts, shape: TrainingShape,
                        budget: Budget | None) -> TrainingShape:
    """The shape with offload and tile decided: the first option that fits (with nothing
    resident), else the one that needs the least device memory."""
    options = activation_options(shape, f)
    if budget is None or len(options) == 1:
        return options[0]
    plans = []
    for option in options:
        p = build(summary, f, option, budget, ())
        if p.fits:
            return option
        plans.append((p.device_total, p.host_total, option))
    return min(plans, key=lambda x: (x[0], x[1]))[2]
