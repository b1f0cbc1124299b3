"""MemoryPlan: the itemised result of planning, its verdict and the words that explain it (pure)."""

from __future__ import annotations

from typing import Any

import attrs

from lema.domain.plan.inputs import Budget, TrainingShape
from lema.domain.plan.items import MemoryItem
from lema.domain.units import format_size
from lema.errors import ConfigError


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
    quantization: str = ""  # the packed weights' format ("NF4 + double quant"), "" when dense


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
    activation_bytes_per_step: int = 0  # offloaded layer inputs: device -> host, and as many back

    @property
    def offload_activations(self) -> bool:
        """Whether this plan moves the checkpointed layer inputs to host memory."""
        return self.shape.offloads

    @property
    def tile_tokens(self) -> int:
        """Positions per sequence tile of each layer (0: layers run whole)."""
        return self.shape.tile

    @property
    def link_bytes_per_step(self) -> int:
        """Bytes over the link per step, both ways: weights host -> device, layer inputs both ways."""
        return self.transfer_bytes_per_step + 2 * self.activation_bytes_per_step

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
        """Seconds per step the link needs at this bandwidth (a lower bound): the weights
        host -> device and the offloaded inputs both ways, on one copy stream."""
        if not bandwidth_bytes_per_s > 0:
            raise ConfigError(f"bandwidth: {bandwidth_bytes_per_s!r} must be positive")
        return self.link_bytes_per_step / bandwidth_bytes_per_s

    def verdict(self) -> str:
        """One line: ``FITS: ...`` or ``DOES NOT FIT: ...; would fit with ...``."""
        return verdict(self)

    def explain(self) -> str:
        """A multi-line human explanation: model, shape, items, verdict, what would fit."""
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
                      "head_chunk_tokens": s.head_chunk_tokens, "reserve_bytes": s.reserve, "mode": s.mode,
                      "local_ranks": s.local_ranks, "offload_activations": self.offload_activations,
                      "tile_tokens": self.tile_tokens},
            "device": {"total_bytes": self.device_total, "items": [i.to_dict() for i in self.device_items]},
            "host": {"total_bytes": self.host_total, "items": [i.to_dict() for i in self.host_items]},
            "budget_bytes": None if self.budget is None else self.budget.device_bytes,
            "host_budget_bytes": None if self.budget is None else self.budget.host_bytes,
            "fits": self.fits, "device_fits": self.device_fits, "host_fits": self.host_fits,
            "headroom_bytes": self.headroom_bytes,
            "resident_units": list(self.resident_units), "streamed_units": list(self.streamed_units),
            "slot_count": self.slot_count, "slot_bytes": self.slot_bytes,
            "transfer_bytes_per_step": self.transfer_bytes_per_step,
            "activation_bytes_per_step": self.activation_bytes_per_step,
            "link_bytes_per_step": self.link_bytes_per_step,
            "recommendations": list(self.recommendations), "fixes": list(self.fixes),
        }



def verdict(p: MemoryPlan) -> str:
    """One line: ``FITS: ...``, ``DOES NOT FIT: ...; would fit with ...`` or ``NEEDS: ...``."""
    if p.budget is None:
        return (f"NEEDS: {format_size(p.device_total)} of device memory and {format_size(p.host_total)} "
                f"of host RAM (no budget given)")
    b = p.budget
    host = "" if b.host_bytes is None else f"; host RAM {format_size(p.host_total)} of {format_size(b.host_bytes)}"
    if p.fits:
        return (f"FITS: {format_size(p.device_total)} of {format_size(b.device_bytes)} "
                f"({format_size(p.headroom_bytes or 0)} headroom){host}")
    short = []
    if not p.device_fits:
        short.append(f"needs {format_size(p.device_total)}, budget {format_size(b.device_bytes)}")
    if not p.host_fits:
        short.append(f"host RAM needs {format_size(p.host_total)}, budget {format_size(b.host_bytes or 0)}")
    tail = ("; would fit with " + " or ".join(p.fixes)) if p.fixes else "; nothing at this budget fits"
    return "DOES NOT FIT: " + "; ".join(short) + tail


def explain(p: MemoryPlan) -> str:
    """A multi-line explanation: model, run, items, link, verdict and recommendations."""
    m, s = p.model, p.shape
    batch = str(s.batch) if s.preference is None else f"{s.batch // 2} pairs ({s.batch} rows)"
    lines = [
        f"model: {m.model_type} ({m.family}), {m.n_layers} layers, hidden {m.hidden_size}, "
        f"{m.parameters:,} parameters, {format_size(m.weight_bytes)} of "
        f"{m.quantization + ' (computing in ' + m.dtype + ')' if m.quantization else m.dtype} weights, "
        f"largest layer {format_size(m.largest_layer_bytes)}",
        f"run: {s.mode}, batch {batch}, seq {s.seq}, LoRA rank {s.lora_rank} on {', '.join(m.lora_targets)}, "
        f"strategy {s.strategy.value}, prefetch {s.prefetch}, checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}, {s.attention_path} attention" + run_extras(p),
        f"device ({format_size(p.device_total)}):",
    ]
    lines += [f"  {i.name}: {format_size(i.bytes)}" + (f" ({i.note})" if i.note else "") for i in p.device_items]
    lines.append(f"host ({format_size(p.host_total)}):")
    lines += [f"  {i.name}: {format_size(i.bytes)}" + (f" ({i.note})" if i.note else "") for i in p.host_items]
    lines.append("link: " + link_line(p))
    lines.append(verdict(p))
    lines += [f"  - {r}" for r in p.recommendations]
    return "\n".join(lines)


def run_extras(p: MemoryPlan) -> str:
    """``", activation offload, 4096-position tiles"`` (empty when neither is on)."""
    out = ""
    if p.offload_activations:
        out += ", activation offload"
    if p.tile_tokens:
        out += f", {p.tile_tokens}-position tiles"
    return out


def link_line(p: MemoryPlan) -> str:
    """What crosses the link per step, both ways."""
    text = f"{format_size(p.transfer_bytes_per_step)} host -> device per step"
    if p.activation_bytes_per_step:
        text = (f"{format_size(p.transfer_bytes_per_step)} of weights + {format_size(p.activation_bytes_per_step)} "
                f"of layer inputs host -> device, {format_size(p.activation_bytes_per_step)} device -> host per step")
    return text
