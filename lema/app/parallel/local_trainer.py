"""LocalTrainer: what data parallelism drives of one rank's own trainer (``LemaTrainer`` has it).

:class:`~lema.app.parallel.data_parallel.DataParallel` names this shape instead of the
trainer, so the trainer may build its collective side without the two modules importing
each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

if TYPE_CHECKING:
    import torch

    from lema.domain.model.lora import LoraSpec, LoraState
    from lema.ports.device import Device


class RankModel(Protocol):
    """What data parallelism reads of the model a rank trains."""

    device: Device
    lora_spec: LoraSpec
    lora: LoraState | None
    dropout_generator: torch.Generator

    def require_lora(self) -> LoraState: ...


class LocalTrainer(Protocol):
    """One rank's trainer: its micro-steps, run here, and the collectives around them."""

    micro_step: int

    @property
    def model(self) -> RankModel: ...

    @property
    def accumulation(self) -> int: ...

    def prepare_batch(self, input_ids: torch.Tensor, labels: torch.Tensor | None,
                      attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> Any: ...

    def run_batch(self, batch: Any, token_count: int | Callable[[], int] | None = None,
                  keep_logits: bool = False) -> tuple[float, int, torch.Tensor | None]: ...

    def end_micro_step(self, loss: float) -> None: ...

    def discard_accumulation(self) -> None: ...

    def loss_totals(self, batches: Iterable[tuple[Any, ...]]) -> tuple[float, int]: ...
