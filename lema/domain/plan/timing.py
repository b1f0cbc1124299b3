"""Step time in the plan: a pure model of how long one training step takes (issue 27).

Inputs: a :class:`~lema.domain.plan.memory_plan.MemoryPlan` (what is resident, streamed,
kept, offloaded: the bytes each stage moves are already planned), the model's
:class:`~lema.domain.plan.items.ModelFacts` (the FLOPs of each phase) and the machine's
:class:`MachineRates` (measured by ``lema plan --calibrate``, or the stated defaults of the
device kind, :func:`default_rates`). Nothing here touches a clock or a device.

The FLOPs of a phase, ``T = batch x seq`` tokens, ``P`` the dense weights a token meets in
one decoder layer (attention projections, MLP; routed experts: the ``k`` it is sent to),
``R = r (in + out)`` summed over the adapted modules:

* ``forward``: ``2 T P + 2 T R`` matmul, ``2 b s^2 q`` attention (causal: half of ``4 b s^2 q``),
  and elementwise traffic (norms, rotary, activation, residuals, LoRA's fp32 copies: the
  bytes the layer saves for the backward, :func:`~lema.domain.plan.items.layer_model`,
  each written and read twice);
* ``recompute``: the forward again, for each layer that does not keep its activations;
* ``backward``: the input gradients through the frozen weights ``2 T P``, LoRA's input
  and weight gradients ``4 T R``, attention's backward (2.5 x its forward), twice the
  forward's elementwise traffic;
* ``head``: the logits and their input gradient ``4 T h V`` and the fp32 cross-entropy
  over ``T V`` (a few passes);
* ``optimizer``: AdamW over the fp32 LoRA parameters (about 16 fp32 reads and writes each).

Time of a phase = matmul FLOPs / matmul rate + attention FLOPs / attention rate +
elementwise bytes / memory rate, plus the fixed cost no FLOP or byte count explains (the
Python and the kernel launches of each op, measured by the calibration on a shrunk copy of
the model's own layer and head, :class:`MachineRates` ``*_overhead_s``): per decoder-layer
pass (forward, recompute; backward), per head chunk, per trainable tensor at the optimizer
step (AdamW, clipping, zeroing: one set of ops per LoRA ``A`` and ``B``), and per step
(the embedding, the targets, the loss read). On a small model these are a large part of a
step (they do not shrink with the model). The engine adds its own bookkeeping per compute
step (``unit_overhead_s``: one per unit and phase; a recompute runs inside its backward's step). A CPU computes where its Python runs, so a pass
takes its work plus its fixed cost; a CUDA host queues the kernels and runs ahead, so a pass
takes the larger of the two (:func:`with_fixed`). The step is then played out over the plan's own layer
schedule (:func:`~lema.domain.schedule.layer_schedule.build_schedule`): one link carrying the
fetches in order, each fetch waiting for its slot's release, each compute waiting for its
unit's fetch; the predicted step is when the last compute ends. The bound is whichever of
the link (or the disk, when its read rate is known and lower) and compute is busy longer,
with its share of the step.

Example:
    >>> from lema.domain.model.spec import ModelSpec
    >>> from lema.domain.plan.planner import plan, TrainingShape
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
    >>> spec = ModelSpec.from_config(cfg, dtype="F32")
    >>> t = predict(plan(spec, TrainingShape(seq=32, device_kind="cpu")), spec)
    >>> t.bound in ("link", "compute", "disk"), t.step_seconds > 0
    (True, True)
"""

from __future__ import annotations

from typing import Any

import attrs

from lema.domain.device_traits import DeviceTraits
from lema.domain.model.spec import ModelSpec
from lema.domain.plan import items as pi
from lema.domain.plan.memory_plan import MemoryPlan
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.schedule.layer_schedule import Compute, Fetch, Phase, Release, build_schedule
from lema.errors import ConfigError

__all__ = ["MachineRates", "PhaseWork", "StepTime", "default_rates", "layer_work", "predict",
           "predict_facts", "trainable_tensors", "with_fixed"]

ADAM_BYTES_PER_PARAM = 16 * pi.FP32  # AdamW: parameter, gradient, two states read and written, temporaries
ATTENTION_BACKWARD = 2.5  # attention's backward over its forward, in FLOPs
ELEMENTWISE_PASSES = 4  # each saved tensor: written and read in the forward, again around the backward
HEAD_ELEMENTWISE_PASSES = 6  # fp32 logits: written, max, exp, sum, log-softmax, gradient


@attrs.frozen(kw_only=True)
class MachineRates:
    """The rates a step time is predicted from.

    Attributes:
        link_bytes_per_s: host -> device through page-locked buffers (the engine's path).
        link_pageable_bytes_per_s: host -> device from ordinary memory.
        matmul_flops_per_s: the device's products at the run's dtype and shapes.
        attention_flops_per_s: fused causal attention at the run's shape (FLOPs as counted
            in the module docstring).
        memory_bytes_per_s: elementwise traffic on the device (norms, activations, casts).
        disk_read_bytes_per_s: reads of the model's file (None: not measured; the link alone
            then bounds the streamed bytes).
        head_memory_bytes_per_s: the elementwise rate of the head's fp32 loss and its gradient
            (measured on the head itself by the calibration; None: ``memory_bytes_per_s``).
        layer_forward_overhead_s: fixed seconds of one decoder layer's forward (or recompute)
            beyond its FLOPs and bytes: the Python and launches of its ops, LoRA modules included.
        layer_backward_overhead_s: the same for one decoder layer's backward.
        head_overhead_s: fixed seconds per chunk of the head's loss (forward + backward in training).
        tensor_overhead_s: fixed seconds per trainable tensor at an optimizer step (AdamW's ops,
            gradient clipping's norm, zeroing).
        step_overhead_s: fixed seconds per step outside the layers, the head and the optimizer
            (embedding, targets, reading the loss, starting the engine's pass).
        unit_overhead_s: the engine's bookkeeping per compute step (one per unit and phase:
            dispatching it, waiting for and releasing its slot, counting it).
        source: where the numbers come from (``"calibrated ..."`` or ``"defaults for ..."``).
        calibrated: measured on this machine (False: the device kind's stated defaults).
    """

    link_bytes_per_s: float
    link_pageable_bytes_per_s: float
    matmul_flops_per_s: float
    attention_flops_per_s: float
    memory_bytes_per_s: float
    disk_read_bytes_per_s: float | None = None
    head_memory_bytes_per_s: float | None = None
    layer_forward_overhead_s: float = 0.0
    layer_backward_overhead_s: float = 0.0
    head_overhead_s: float = 0.0
    tensor_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    unit_overhead_s: float = 0.0
    source: str = ""
    calibrated: bool = False

    def __attrs_post_init__(self) -> None:
        bad = [f"{a.name}={getattr(self, a.name)!r}" for a in attrs.fields(MachineRates)
               if a.name.endswith("_per_s") and getattr(self, a.name) is not None
               and not (isinstance(getattr(self, a.name), (int, float)) and getattr(self, a.name) > 0)]
        bad += [f"{a.name}={getattr(self, a.name)!r} must be a number >= 0" for a in attrs.fields(MachineRates)
                if a.name.endswith("_overhead_s")
                and not (isinstance(getattr(self, a.name), (int, float)) and getattr(self, a.name) >= 0)]
        if bad:
            raise ConfigError("machine rates: " + ", ".join(b if "must" in b else b + " must be a positive number"
                                                         for b in bad))

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MachineRates":
        """The rates a :meth:`to_dict` wrote (a calibration cache); ConfigError when malformed."""
        names = {a.name for a in attrs.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise ConfigError(f"machine rates: {exc}") from None


def default_rates(traits: DeviceTraits, dtype: str) -> MachineRates:
    """The stated defaults of a device kind (:class:`DeviceTraits` ``default_*``), at ``dtype``
    (``"F32"`` products run at the kind's fp32 rate, half precision at its half rate)."""
    half = dtype in ("BF16", "F16")
    return MachineRates(
        link_bytes_per_s=traits.default_link_bytes_per_s,
        link_pageable_bytes_per_s=traits.default_link_pageable_bytes_per_s,
        matmul_flops_per_s=traits.default_half_flops_per_s if half else traits.default_fp32_flops_per_s,
        attention_flops_per_s=(traits.default_half_flops_per_s if half else traits.default_fp32_flops_per_s)
        * traits.default_attention_efficiency,
        memory_bytes_per_s=traits.default_memory_bytes_per_s,
        layer_forward_overhead_s=traits.default_layer_overhead_s,
        layer_backward_overhead_s=2 * traits.default_layer_overhead_s,
        head_overhead_s=traits.default_layer_overhead_s,
        tensor_overhead_s=traits.default_tensor_overhead_s,
        step_overhead_s=traits.default_step_overhead_s,
        unit_overhead_s=traits.default_unit_overhead_s,
        source=f"defaults for {traits.kind} (not calibrated: run `lema plan --calibrate`)",
    )


@attrs.frozen
class PhaseWork:
    """The work of one phase: matmul FLOPs, attention FLOPs, elementwise bytes."""

    matmul: float = 0.0
    attention: float = 0.0
    memory: float = 0.0

    def seconds(self, rates: MachineRates) -> float:
        return (self.matmul / rates.matmul_flops_per_s + self.attention / rates.attention_flops_per_s
                + self.memory / rates.memory_bytes_per_s)

    def __add__(self, other: "PhaseWork") -> "PhaseWork":
        return PhaseWork(self.matmul + other.matmul, self.attention + other.attention, self.memory + other.memory)


def _dense_params(f: pi.ModelFacts) -> int:
    """Dense weights one token meets in a decoder layer (routed experts: its ``top_k``)."""
    h = f.hidden
    attention = h * (2 * f.q_dim + 2 * f.kv_dim)
    if f.experts:
        mlp = 3 * h * f.expert_ffn * f.top_k + 3 * h * f.dense_ffn + h * f.experts
    elif f.formulas is pi.LEARNED_FUSED:
        mlp = 2 * h * f.ffn
    else:
        mlp = 3 * h * f.ffn
    return attention + mlp


def layer_work(f: pi.ModelFacts, batch: int, seq: int, rank: int, attention: str) -> tuple[PhaseWork, PhaseWork]:
    """(forward, backward) work of one decoder layer (the backward without the recompute)."""
    t = batch * seq
    p = _dense_params(f)
    r = rank * sum(i + o for i, o in f.lora_modules)
    attn = 2.0 * batch * seq * seq * f.q_dim
    saved = sum(i.bytes for i in pi.layer_model(f, batch, seq, rank, attention).saved)
    quant = (f.dequant_bytes[1] if len(f.dequant_bytes) > 1 else 0)  # dense bytes written per dequantization
    forward = PhaseWork(matmul=2.0 * t * p + 2.0 * t * r, attention=attn,
                        memory=ELEMENTWISE_PASSES * saved + 2 * quant)
    backward = PhaseWork(matmul=2.0 * t * p + 4.0 * t * r, attention=ATTENTION_BACKWARD * attn,
                         memory=2 * ELEMENTWISE_PASSES * saved + 2 * quant)
    return forward, backward


def head_work(f: pi.ModelFacts, batch: int, seq: int, training: bool) -> PhaseWork:
    """The head's work: the logits (and their input gradient) and the fp32 loss's traffic."""
    t = batch * seq
    logits = 2.0 * t * f.hidden * f.vocab
    return PhaseWork(matmul=logits * (2 if training else 1),
                     memory=HEAD_ELEMENTWISE_PASSES * t * f.vocab * pi.FP32)


def with_fixed(work_s: float, fixed_s: float, overlapped: bool) -> float:
    """A pass's time from its work and its fixed cost: their sum where the host computes
    (a CPU), the larger where the host only queues the device's work and runs ahead (CUDA:
    the launches hide behind the device's kernels, :attr:`DeviceTraits.async_compute`)."""
    return max(work_s, fixed_s) if overlapped else work_s + fixed_s


def head_seconds(f: pi.ModelFacts, batch: int, seq: int, training: bool, rates: MachineRates,
                 chunk_tokens: int = 1024, overlapped: bool = False) -> float:
    """The head's time: its traffic at the head's own elementwise rate when it was measured,
    with the fixed cost of each of its ``ceil(T / chunk_tokens)`` chunks."""
    work = head_work(f, batch, seq, training)
    memory = rates.head_memory_bytes_per_s or rates.memory_bytes_per_s
    chunks = -(-batch * seq // max(chunk_tokens, 1))
    return with_fixed(work.matmul / rates.matmul_flops_per_s + work.memory / memory,
                      chunks * rates.head_overhead_s + rates.unit_overhead_s, overlapped)


def trainable_tensors(f: pi.ModelFacts) -> int:
    """The LoRA tensors the optimizer steps: an ``A`` and a ``B`` per adapted module and layer."""
    return 2 * len(f.lora_modules) * f.n_layers


@attrs.frozen
class StepTime:
    """A predicted step.

    Attributes:
        step_seconds: the whole step, link and compute overlapped as the schedule allows.
        phases: seconds of compute per phase (``forward``, ``recompute``, ``backward``,
            ``head``, ``optimizer``, ``step``: the per-step fixed cost).
        fixed_seconds: what the fixed costs add to the phases (per-layer, per-chunk,
            per-tensor and per-step overheads; on an asynchronous device only a pass's
            overhead beyond its work, :func:`with_fixed`).
        link_seconds: the link's busy time (weights and offloaded inputs).
        disk_seconds: the streamed weights at the disk's read rate (0 when not known).
        moved_bytes: the weight bytes fetched per step.
        bound: ``"link"``, ``"disk"`` or ``"compute"``: whichever is busy longest.
        share: that one's busy time over the step (0..1).
        tokens_per_second: ``batch x seq / step_seconds``.
        rates: the rates used.
    """

    step_seconds: float
    phases: dict[str, float]
    fixed_seconds: float
    link_seconds: float
    disk_seconds: float
    bound: str
    share: float
    tokens_per_second: float
    rates: MachineRates
    moved_bytes: int = 0  # the weight bytes fetched per step (what the drive's term spreads over)

    @property
    def compute_seconds(self) -> float:
        return sum(self.phases.values())

    def line(self) -> str:
        """``time: 1.23 s per step (3,330 tokens/s), compute-bound (97%); forward 0.30 s, ...``"""
        parts = ", ".join(f"{k} {v:.3g} s" for k, v in self.phases.items() if v)
        text = (f"{self.step_seconds:.3g} s per step ({self.tokens_per_second:,.0f} tokens/s), "
                f"{self.bound}-bound ({self.share:.0%}); {parts} (fixed cost {self.fixed_seconds:.3g} s); "
                f"link {self.link_seconds:.3g} s")
        if self.disk_seconds:
            text += f", disk {self.disk_seconds:.3g} s"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"step_seconds": self.step_seconds, "fixed_seconds": self.fixed_seconds,
                "tokens_per_second": self.tokens_per_second,
                "bound": self.bound, "bound_share": self.share, "phases_seconds": dict(self.phases),
                "compute_seconds": self.compute_seconds, "link_seconds": self.link_seconds,
                "disk_seconds": self.disk_seconds, "rates": self.rates.to_dict()}


def predict(p: MemoryPlan, spec: ModelSpec, rates: MachineRates | None = None) -> StepTime:
    """The predicted step of plan ``p`` of ``spec`` (default rates: the plan's device kind's)."""
    from lema.domain.plan.assemble import facts_for

    return predict_facts(p, facts_for(spec, p.shape), rates)


def predict_facts(p: MemoryPlan, f: pi.ModelFacts, rates: MachineRates | None = None) -> StepTime:
    """:func:`predict` from the model facts already made (the planner's search calls this)."""
    s = p.shape
    rates = default_rates(s.device, p.model.dtype) if rates is None else rates
    n = f.n_layers
    b, seq = s.batch, s.seq
    fwd, bwd = layer_work(f, b, seq, s.lora_rank, s.attention_path)
    overlapped = s.device.async_compute
    fwd_s = with_fixed(fwd.seconds(rates), rates.layer_forward_overhead_s + rates.unit_overhead_s, overlapped)
    recompute_s = with_fixed(fwd.seconds(rates), rates.layer_forward_overhead_s, overlapped)  # in the backward's step
    bwd_s = with_fixed(bwd.seconds(rates), rates.layer_backward_overhead_s + rates.unit_overhead_s, overlapped)
    kept = p.kept_units if s.gradient_checkpointing else frozenset(range(1, n + 1))
    head_s = head_seconds(f, b, seq, s.training, rates, s.head_chunk_tokens, overlapped)
    optimizer_s = (pi.lora_parameters(f, s.lora_rank) * ADAM_BYTES_PER_PARAM / rates.memory_bytes_per_s
                   + trainable_tensors(f) * rates.tensor_overhead_s if s.training else 0.0)
    compute: dict[tuple[int, Phase], float] = {}
    head_unit = n + 1
    for u in range(1, n + 2):
        if u == head_unit:
            compute[(u, Phase.FORWARD)] = head_s
            continue
        compute[(u, Phase.FORWARD)] = fwd_s
        if s.training:
            recompute = 0.0 if u in kept else recompute_s
            compute[(u, Phase.BACKWARD)] = bwd_s + recompute
    phases = {"forward": n * fwd_s, "recompute": 0.0, "backward": 0.0, "head": head_s, "optimizer": optimizer_s,
              "step": rates.step_overhead_s}
    if s.training:
        phases["recompute"] = phases_recompute(n, kept) * recompute_s
        phases["backward"] = n * bwd_s

    in_place = s.weights_in_place and not f.quantization
    link_rate = rates.link_bytes_per_s if (s.device.pinned_host or s.strategy is MemoryStrategy.RESIDENT) \
        else rates.link_pageable_bytes_per_s
    if s.device.host_memory:
        link_rate = rates.link_bytes_per_s  # the CPU's "link" is a copy within its memory (or simulated)
    disk_rate = rates.disk_read_bytes_per_s if s.strategy is not MemoryStrategy.RESIDENT else None
    rate = min(link_rate, disk_rate) if disk_rate else link_rate
    resident = frozenset(range(1, n + 2)) if in_place else frozenset(p.resident_units)
    units = list(range(1, n + 2))
    steps = build_schedule(units, s.prefetch, resident, "train" if s.training else "forward",
                           frozenset(range(1, n + 1)) if s.training else None)
    offload_s = 2 * p.activation_bytes_per_step / link_rate
    end, link_busy = _play(steps, compute, f.unit_bytes, rate)
    link_busy += offload_s  # offloaded inputs share the link; their copies overlap the compute
    step = rates.step_overhead_s + max(end, link_busy) + optimizer_s
    moved = sum(f.unit_bytes[x.unit] for x in steps if isinstance(x, Fetch))
    link_seconds = moved / link_rate + offload_s
    disk_seconds = moved / disk_rate if disk_rate else 0.0
    compute_total = sum(phases.values())
    busy = {"compute": compute_total, "link": link_seconds, "disk": disk_seconds}
    bound = max(busy, key=lambda k: busy[k])
    recomputes = phases_recompute(n, kept) if s.training else 0
    fixed = ((fwd_s - fwd.seconds(rates)) * n + (recompute_s - fwd.seconds(rates)) * recomputes
             + (bwd_s - bwd.seconds(rates)) * (n if s.training else 0)
             + head_s - head_seconds(f, b, seq, s.training, attrs.evolve(rates, head_overhead_s=0.0,
                                                                          unit_overhead_s=0.0))
             + (trainable_tensors(f) * rates.tensor_overhead_s if s.training else 0.0) + rates.step_overhead_s)
    return StepTime(step_seconds=step, phases=phases, fixed_seconds=fixed, link_seconds=link_seconds, disk_seconds=disk_seconds,
                    bound=bound, share=min(1.0, busy[bound] / step) if step > 0 else 0.0,
                    tokens_per_second=b * seq / step if step > 0 else 0.0, rates=rates, moved_bytes=moved)


def phases_recompute(n: int, kept: frozenset[int]) -> int:
    """Decoder layers (units ``1..n``) that recompute their forward in the backward."""
    return n - len(kept & set(range(1, n + 1)))


def _play(steps: tuple, compute: dict[tuple[int, Phase], float], unit_bytes: tuple[int, ...],
          rate: float) -> tuple[float, float]:
    """Play the schedule: one link in fetch order, computes in order. Returns (end, link busy)."""
    link_free = 0.0
    compute_free = 0.0
    slot_free: dict[int, float] = {}
    ready: dict[int, float] = {}  # unit -> its fetch's end
    busy = 0.0
    for step in steps:
        if isinstance(step, Fetch):
            start = max(link_free, slot_free.get(step.slot, 0.0))
            link_free = start + unit_bytes[step.unit] / rate
            busy += unit_bytes[step.unit] / rate
            ready[step.unit] = link_free
        elif isinstance(step, Compute):
            start = max(compute_free, ready.get(step.unit, 0.0) if step.slot is not None else 0.0)
            compute_free = start + compute.get((step.unit, step.phase), 0.0)
        elif isinstance(step, Release):
            slot_free[step.slot] = compute_free
    return compute_free, busy
