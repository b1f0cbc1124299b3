"""LEMA: Layer-wise Efficient Memory Abstraction.

Fine-tune LoRA adapters on language models larger than the GPU by streaming the frozen
base weights to the device one layer at a time.
"""

import os as _os
import sys as _sys


def _shorter_openmp_spin() -> None:
    """Let torch's OpenMP threads stop spinning sooner when a core is taken from them.

    At the end of each parallel region GNU OpenMP's threads busy-wait for the others, 300,000
    spins by default. When other programs share the cores, one of torch's threads is often
    descheduled, and the other spins out its time slice for it on every operation: the
    demo on 2 cores beside 2 busy processes took 5.5x its quiet time (fair sharing
    explains 2x). 100,000 spins: 3.3x, the quiet time unchanged (24.5 vs 24.4 s); a
    passive wait (``OMP_WAIT_POLICY=PASSIVE``) 1.9x loaded but 35% slower quiet.
    (docs/benchmarks.md, ``python -m benchmarks.contention``.) libgomp reads this once,
    when torch loads it, so it is set only before torch is imported, and never over a
    setting of the user's.
    """
    if "torch" in _sys.modules or "OMP_WAIT_POLICY" in _os.environ or "GOMP_SPINCOUNT" in _os.environ:
        return
    _os.environ["GOMP_SPINCOUNT"] = "100000"


_shorter_openmp_spin()

from lema.errors import (  # noqa: E402
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
    "train": "lema.app.training.train_api", "TrainResult": "lema.app.training.train_api",
    "Callback": "lema.app.training.callbacks", "Run": "lema.app.training.callbacks",
}


def __getattr__(name: str):
    # Imported on first use so that `import lema.errors` (and the CLI's --help) stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lema' has no attribute {name!r}")

__all__ = [
    "Callback", "CheckpointError", "ConfigError", "DataError", "DeviceOutOfMemory", "DoesNotFitError",
    "LemaConfig", "LemaError", "LemaModel", "LemaTrainer", "MemoryStrategy", "ModelFormatError",
    "RankFailedError", "Run", "TrainOptions", "TrainResult", "__version__", "run_training", "train",
]
