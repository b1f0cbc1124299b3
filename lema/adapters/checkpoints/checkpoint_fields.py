"""What the JSON parts of a checkpoint must hold, checked before any of it is used.

``trainer_state.json`` (step counters, RNG states, scheduler state, the LemaConfig) and
the optimizer's metadata are files a user can edit, truncate or mix up; a wrong type
there must be one :class:`~lema.errors.CheckpointError` naming the file and the field,
not a ``TypeError`` from deep inside the optimizer or the scheduler at the next step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lema.errors import CheckpointError

# A step counter past 2**63 is no real run; torch's schedulers keep it in an int64.
MAX_STEP = 2**63 - 1


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_trainer_state(state: Mapping[str, Any], path: str | Path) -> None:
    """Raise CheckpointError naming every field of ``trainer_state.json`` with a wrong type.

    ``global_step`` and ``micro_step`` are integers >= 0; ``rng`` and ``scheduler`` objects
    or null, ``dropout_rng`` a string or null; ``config`` an object (the LemaConfig's own
    checks run when it is built).
    """
    problems = []
    for name in ("global_step", "micro_step"):
        if name in state and not _count(state[name]):
            problems.append(f"{name}={_shown(state[name])} must be an integer from 0 to 2**63 - 1")
    for name in ("rng", "scheduler", "config"):
        if state.get(name) is not None and not isinstance(state[name], dict):
            problems.append(f"{name}={_shown(state[name])} must be a JSON object")
    if state.get("dropout_rng") is not None and not isinstance(state["dropout_rng"], str):
        problems.append(f"dropout_rng={_shown(state['dropout_rng'])} must be a base64 string")
    rng = state.get("rng")
    if isinstance(rng, dict):
        if not isinstance(rng.get("torch"), str):
            problems.append("rng.torch must be a base64 string")
        python = rng.get("python")
        if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)
                and all(_count(v) for v in python[1])):
            problems.append("rng.python must be [version, [integers], gauss]")
        if "cuda" in rng and not (isinstance(rng["cuda"], list) and all(isinstance(s, str) for s in rng["cuda"])):
            problems.append("rng.cuda must be a list of base64 strings")
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}; the checkpoint is corrupt, use an earlier one")


def check_scheduler_state(saved: Mapping[str, Any], fresh: Mapping[str, Any], path: str | Path) -> None:
    """The saved LR scheduler state must have the fields (and their types) of a fresh one.

    A scheduler's ``load_state_dict`` sets whatever keys it is given as attributes, so an
    unknown or mistyped key would break the scheduler later, or replace one of its methods.
    """
    problems = []
    unknown = sorted(set(saved) - set(fresh))
    if unknown:
        problems.append(f"unknown fields {', '.join(map(repr, unknown[:5]))}")
    for key, value in saved.items():
        if key in fresh and not _same_kind(value, fresh[key]):
            problems.append(f"{key}={_shown(value)} should be like {_shown(fresh[key])}")
    if problems:
        raise CheckpointError(f"{path}: the LR scheduler state does not fit this scheduler ({'; '.join(problems)}); "
                              "resume with the same --lr-schedule, or use an earlier checkpoint")


def check_hyperparameters(saved: list[Mapping[str, Any]], fresh: list[Mapping[str, Any]], path: str | Path) -> None:
    """Each saved optimizer group's hyperparameters have the types of the fresh optimizer's."""
    problems = []
    for i, (group, like) in enumerate(zip(saved, fresh)):
        for key, value in group.items():
            if key in like and key != "params" and not _same_kind(value, like[key]):
                problems.append(f"group {i} {key}={_shown(value)} should be like {_shown(like[key])}")
    if problems:
        raise CheckpointError(f"{path}: optimizer hyperparameters of the wrong type ({'; '.join(problems[:4])}); "
                              "the checkpoint is corrupt, use an earlier one")


def _is_number(value: Any) -> bool:
    if hasattr(value, "dim") and hasattr(value, "item"):  # a 0-d tensor (capturable optimizers keep lr so)
        return value.dim() == 0
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_kind(value: Any, like: Any) -> bool:
    if like is None or value is None:
        return True
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(like, bool) and isinstance(value, bool)
    if _is_number(like):
        return _is_number(value) and (not isinstance(like, int) or isinstance(value, int))
    if isinstance(like, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(like) and all(
            _same_kind(v, w) for v, w in zip(value, like))
    if isinstance(like, dict):
        return isinstance(value, dict)
    return type(value) is type(like)


def check_optimizer_meta(meta: Any, path: str | Path) -> None:
    """The optimizer metadata's structure: what ``load_optimizer_state`` walks."""
    problems = []
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the optimizer metadata must be a JSON object; the checkpoint is corrupt")
    names = meta.get("param_names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)):
        problems.append("param_names must be a list of distinct names")
        names = []
    if not isinstance(meta.get("state"), dict) or not set(meta["state"]) <= set(names):
        problems.append("state must be an object keyed by parameter names")
    groups = meta.get("param_groups")
    if not (isinstance(groups, list) and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and set(g["params"]) <= set(names)
            and isinstance(g.get("hyper"), dict) for g in groups)):
        problems.append("param_groups must be a list of {params: [names], hyper: {...}}")
    if problems:
        raise CheckpointError(f"{path}: optimizer metadata is malformed ({'; '.join(problems)}); "
                              "the checkpoint is corrupt, use an earlier one")
