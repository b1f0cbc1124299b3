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
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "DeviceOutOfMemory", "DoesNotFitError",
    "LemaError", "ModelFormatError", "__version__",
]
