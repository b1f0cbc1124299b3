"""The lines a training run writes: metrics windows (``--logging-steps``), log lines with
the elapsed time and ETA, the device peak, and the compact plan summary."""

from __future__ import annotations

from typing import Any

from lema.app.training.step_time import peak_text, time_text


class Window:
    """The steps since the last metrics record (``--logging-steps``)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.seconds = 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.seconds += seconds

    def take(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loss": sum(self.losses) / len(self.losses), "tokens": self.tokens,
                               "seconds": self.seconds,
                               "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None}
        if len(self.losses) > 1:
            out["logged_steps"] = len(self.losses)
        self.__init__()  # type: ignore[misc]
        return out


def clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def log_line(record: dict[str, Any], total: int, elapsed: float | None = None) -> str:
    tps = record.get("tokens_per_s")
    peak = record.get("device_peak_bytes")
    eta = record.get("eta_s")
    norm = record.get("grad_norm")
    return (f"step {record['step']}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}"
            + (f"  grad_norm {norm:.3g}" if norm is not None else "")
            + (f"  loss_scale {record['loss_scale']:g}" if record.get("loss_scale") is not None else "")
            + (f"  {tps:,.0f} tok/s" if tps else "") + (f"  device {peak_text(record)}" if peak else "")
            + (f"  elapsed {clock(elapsed)}" if elapsed is not None else "")
            + (f"  ETA {clock(eta)}" if eta is not None and record['step'] < total else "")
            + time_text(record, "  "))


def plan_summary(model: Any, asked: str | None = None) -> str:
    """A compact plan: strategy, device (how ``--device auto`` chose it, when ``asked`` is
    ``"auto"``), shape, device total against the budget, the verdict."""
    from lema.domain.units import format_size

    p = model.plan()
    s = p.shape
    where = str(model.device.torch_device)
    if asked == "auto":
        where += " (--device auto: " + ("a GPU is available)" if where.startswith("cuda") else
                                        "no GPU available; --device cuda needs one)")
    head = (f"plan: {s.strategy.value} on {where}, batch {s.batch} x seq {s.seq}, "
            f"LoRA rank {s.lora_rank} ({p.model.lora_parameters:,} trainable parameters), "
            f"{p.model.n_layers} layers, {len(p.resident_units)} units resident"
            + (", activation offload" if p.offload_activations else "")
            + (f", {p.tile_tokens}-position tiles" if p.tile_tokens else ""))
    if p.budget is None:
        body = f"device {format_size(p.device_total)} needed (no budget to check against)"
    else:
        body = (f"device {format_size(p.device_total)} of {format_size(p.budget.device_bytes)} budget "
                f"(headroom {format_size(p.headroom_bytes)}): {'fits' if p.fits else 'DOES NOT FIT'}")
    return head + "\n      " + body
