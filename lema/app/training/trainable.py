"""TrainableModel: what a trainer drives of a model (the facade :class:`~lema.app.training.model.LemaModel` has it).

The trainer names this shape instead of the facade, so the facade may build its trainer
(``LemaModel.get_trainer``) without the two modules importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from lema.app.runtime.engine import Engine
    from lema.app.runtime.step_report import StepReport
    from lema.config import LemaConfig
    from lema.domain.model.lora import LoraSpec, LoraState
    from lema.domain.model.spec import ModelSpec
    from lema.domain.nn.context import BlockContext
    from lema.domain.plan.memory_plan import MemoryPlan
    from lema.ports.device import Device


class TrainableModel(Protocol):
    """A base model with LoRA adapters that a :class:`~lema.app.training.trainer.LemaTrainer` trains."""

    config: LemaConfig
    spec: ModelSpec
    device: Device
    engine: Engine
    lora_spec: LoraSpec
    dropout_generator: torch.Generator
    last_report: StepReport | None
    compute_dtype: torch.dtype  # float16: the trainer scales the loss (lema.app.training.loss_scaling)
    lora: LoraState | None  # the adapters (None before initialize_lora / load_adapter)

    def require_lora(self) -> LoraState: ...

    def get_trainable_parameters(self) -> list[torch.Tensor]: ...

    def plan(self) -> MemoryPlan: ...

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, training: bool,
                       position_ids: torch.Tensor | None = None) -> tuple[BlockContext, torch.Tensor]: ...

    def targets_for(self, input_ids: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor: ...

    def cast_weights(self, weights: Any) -> Any: ...

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> tuple[float, int]: ...

    def input_paths(self) -> list[Path]: ...

    def adapter_config(self) -> dict[str, Any]: ...

    def adapter_state(self, path: str | Path, config: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> tuple[LoraSpec, LoraState]: ...


class StreamedModel(TrainableModel, Protocol):
    """What generation reads of a model besides the trainer's surface (LemaModel has it)."""

    embedding: Any
    matmul_dtype: torch.dtype | None
