"""``--seq`` against the model's context, for ``lema train`` (run_training) and ``lema plan``.

A sequence longer than ``max_position_embeddings`` reaches positions the model never saw:
with learned positions (GPT-2) there are none, so it is refused; with rotary positions it
is what context extension does (with a ``rope_scaling`` the config sets), so it runs with a
warning that says so. No model's context is longer than the bound on
``max_position_embeddings`` (16,777,216), so a longer ``--seq`` is refused outright.
"""

from __future__ import annotations

from typing import Any, Callable

from lema.domain.families import registry
from lema.domain.nn.config_values import MAX_POSITIONS
from lema.errors import ConfigError


def check_seq(seq: int, spec: Any, warn: Callable[[str], None], flag: str = "--seq") -> None:
    """Refuse or warn about ``seq`` beyond ``spec``'s context (see the module docstring).

    Raises:
        ConfigError: ``seq`` beyond a model with learned positions, or beyond any model's.
    """
    context = spec.max_positions
    if seq <= context:
        return
    if seq > MAX_POSITIONS:
        raise ConfigError(f"{flag} {seq:,} is longer than any model's context (at most {MAX_POSITIONS:,} positions; "
                          f"this one's is {context:,}); pass --seq {context} or less")
    if not registry.params_of(spec).layout.ropes:
        raise ConfigError(f"{flag} {seq:,} is longer than the model's {context:,} learned positions; "
                          f"pass --seq {context} or less")
    warn(f"warning: {flag} {seq:,} is longer than the model's context ({context:,} positions, "
         "max_position_embeddings): the positions past it were never trained (context extension; set rope_scaling "
         "in the config to scale them)")
