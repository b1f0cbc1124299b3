"""LEMA: Layer-wise Efficient Memory Abstraction.

Fine-tune LoRA adapters on language models larger than the GPU by streaming the frozen
base weights to the device one layer at a time.
"""

from lema.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceOutOfMemory,
    DoesNotFitError,
    LemaError,
    ModelFormatError,
    RankFailedError,
)

__version__ = "0.1.0"

_LAZY = {
    "LemaConfig": "lema.config", "MemoryStrategy": "lema.config",
    "LemaModel": "lema.app.training.model", "LemaTrainer": "lema.app.training.trainer",
    "TrainOptions": "lema.app.training.run_training", "run_training": "lema.app.training.run_training",
}


def __getattr__(name: str):
    # Imported on first use so that `import lema.errors` (and the CLI's --help) stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lema' has no attribute {name!r}")

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "DeviceOutOfMemory", "DoesNotFitError",
    "LemaConfig", "LemaError", "LemaModel", "LemaTrainer", "MemoryStrategy", "ModelFormatError",
    "RankFailedError", "TrainOptions", "__version__", "run_training",
]
