"""LEMA's own random streams: the adapter initialisation and the LoRA dropout masks.

Both come from ``LemaConfig.seed`` through ``torch.Generator`` objects LEMA owns, never
from the global torch RNG, so a run's adapters depend on its seed alone (not on what the
caller's code drew before). The dropout generator's state is saved in every checkpoint
(``trainer_state.json``, key ``dropout_rng``) and restored by every resume path, so a
resumed run draws the same masks as a straight one.
"""

from __future__ import annotations

import base64

import torch

from lema.errors import CheckpointError

# Two streams from one seed: the dropout stream is offset so that it never replays the
# initialisation's draws.
_DROPOUT_STREAM = 0x6C656D612D64726F  # "lema-dro"


def init_seed(seed: int) -> int:
    """The seed of the adapter-initialisation generator for ``LemaConfig.seed``."""
    return int(seed) % 2**64


def dropout_seed(seed: int) -> int:
    """The seed of the LoRA-dropout generator for ``LemaConfig.seed``."""
    return (int(seed) + _DROPOUT_STREAM) % 2**64


def generator_state(generator: torch.Generator) -> str:
    """A generator's state as base64 text (JSON-able)."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def set_generator_state(generator: torch.Generator, text: object) -> None:
    """Restore a state captured by :func:`generator_state`.

    Raises:
        CheckpointError: the text is not such a state.
    """
    try:
        if not isinstance(text, str):
            raise TypeError(f"expected base64 text, found {type(text).__name__}")
        state = torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()
        generator.set_state(state)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"trainer_state.json: dropout_rng is malformed ({exc}); the checkpoint is "
                              "corrupt, use an earlier one") from None
