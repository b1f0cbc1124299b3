"""Dynamic loss scaling for float16 training, as ``torch.amp.GradScaler`` does it.

float16 keeps 5 exponent bits: gradients below 6e-8 flush to zero, so a float16 run's small
gradients vanish (transformers + peft users train such models with a ``GradScaler``). When a
run computes in float16 (:mod:`lema.domain.model.precision`: a float16 file on a device with
no native bfloat16, or ``dtype="float16"``), the trainer multiplies the loss by a scale
before the backward, so the gradients flowing back through float16 activations are that
many times larger, and divides the adapters' float32 gradients by it before clipping and
the optimizer step. The scale starts at 2**16; a step whose unscaled gradients hold an inf
or NaN (the scale was too large) is skipped and the scale halved; after 2000 clean steps in
a row the scale doubles. These are GradScaler's defaults and its rules, step for step.

Example:
    >>> scaler = LossScaler(growth_interval=2)
    >>> g = [torch.tensor([1.0, float("inf")])]
    >>> scaler.unscale_(g), scaler.scale
    (True, 65536.0)
    >>> scaler.update(True); scaler.scale
    32768.0
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lema.errors import CheckpointError

__all__ = ["LossScaler"]


class LossScaler:
    """The scale and its growth counter (host floats: the scale is a power of two, so
    multiplying and dividing by it is exact, and no device value is read for it).

    Args:
        init_scale, growth_factor, backoff_factor, growth_interval: as ``torch.amp.GradScaler``'s.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.growth_tracker = 0  # clean steps since the scale last changed
        self.skipped = 0  # optimizer steps skipped for an inf or NaN gradient

    def unscale_(self, grads: Sequence[torch.Tensor]) -> bool:
        """Divide ``grads`` by the scale in place (as GradScaler: times the float32 reciprocal);
        returns whether any of them holds an inf or NaN (one read from the device)."""
        if not grads:
            return False
        inv = torch.tensor(1.0, dtype=torch.float64).div(self.scale).float().item()
        torch._foreach_mul_(list(grads), inv)
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        return not bool(finite)

    def skips(self, grads: Sequence[torch.Tensor]) -> bool:
        """Unscale ``grads``; when one holds an inf or NaN, count the optimizer step as skipped
        and back off (GradScaler's ``step`` and ``update``) and return True; else False (the
        caller steps, then calls ``update(False)``)."""
        if not self.unscale_(grads):
            return False
        self.skipped += 1
        self.update(True)
        return True

    def update(self, found_inf: bool) -> None:
        """After an optimizer step (``found_inf``: it was skipped): back off at once, grow after
        ``growth_interval`` clean steps in a row (``torch._amp_update_scale_``'s rule)."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = self.scale * self.growth_factor
            if grown != float("inf") and grown <= torch.finfo(torch.float32).max:
                self.scale = grown
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (``trainer_state.json``'s ``loss_scale``)."""
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "skipped": self.skipped,
                "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval}

    def load_state_dict(self, state: dict[str, Any], where: str = "the checkpoint") -> None:
        try:
            scale, tracker = float(state["scale"]), int(state["growth_tracker"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: trainer_state.json's loss_scale is not a loss scale ({state!r}); "
                                  "restore the file from the run's checkpoint") from None
        if not (0 < scale < float("inf")) or tracker < 0:
            raise CheckpointError(f"{where}: trainer_state.json's loss_scale has scale {scale} and growth "
                                  f"tracker {tracker}; restore the file from the run's checkpoint")
        self.scale, self.growth_tracker = scale, tracker
        self.skipped = int(state.get("skipped", 0))
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
