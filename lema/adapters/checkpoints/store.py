"""Training checkpoint directories: PEFT adapter, optimizer and trainer state, no pickle.

A checkpoint directory holds:

* ``adapter_config.json`` + ``adapter_model.safetensors``: PEFT's LoRA format, so
  ``peft.PeftModel.from_pretrained(base, path)`` loads it;
* ``optimizer.safetensors``: the optimizer's state tensors; its metadata key
  ``optimizer`` holds the JSON from :func:`optimizer_to_tensors` (hyperparameters, scalars);
* ``trainer_state.json``: step, RNG states (:func:`rng_state`), config: anything JSON;
* tokenizer files, when a tokenizer folder is given.

The directory is replaced as a whole (:func:`lema.adapters.checkpoints.atomic.atomic_directory`), so
a crash leaves the previous checkpoint or the new one, never a mix.

Example:
    >>> write_checkpoint(tmp / "ckpt", adapter_tensors=tensors, adapter_config=cfg)  # doctest: +SKIP
    >>> read_checkpoint(tmp / "ckpt").adapter_config["r"]  # doctest: +SKIP
    8
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lema.adapters.checkpoints.atomic import atomic_directory, recover_directory
from lema.adapters.checkpoints.checkpoint_fields import (
    check_hyperparameters,
    check_optimizer_meta,
    check_trainer_state,
)
from lema.adapters.json_files import read_json_object
from lema.adapters.weights.hub import TOKENIZER_FILES
from lema.domain.json_values import JsonValueError, parse_json
from lema.domain.model.finite import first_non_finite
from lema.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FORMAT = "lema-optimizer-v1"
# Everything a checkpoint folder may hold: what write_checkpoint writes.
CHECKPOINT_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER, TRAINER_STATE, *TOKENIZER_FILES})


@attrs.frozen
class Checkpoint:
    """The contents of a checkpoint directory.

    Attributes:
        adapter_config: the PEFT ``adapter_config.json`` dict.
        adapter_tensors: PEFT key -> tensor.
        optimizer_tensors: state tensors from :func:`optimizer_to_tensors`, or None.
        optimizer_meta: the JSON half of :func:`optimizer_to_tensors`, or None.
        trainer_state: the ``trainer_state.json`` dict, or None.
    """

    adapter_config: dict[str, Any]
    adapter_tensors: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor] | None = None
    optimizer_meta: dict[str, Any] | None = None
    trainer_state: dict[str, Any] | None = None


def _plain(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views sharing storage; a contiguous CPU copy of each is safe.
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    adapter_tensors: Mapping[str, torch.Tensor],
    adapter_config: Mapping[str, Any],
    optimizer_tensors: Mapping[str, torch.Tensor] | None = None,
    optimizer_meta: Mapping[str, Any] | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a checkpoint directory atomically, replacing any previous one at ``path``.

    Args:
        path: the checkpoint directory.
        adapter_tensors: PEFT key names (``base_model.model....lora_A.weight``) -> tensors.
        adapter_config: the PEFT LoRA config dict (``peft_type`` defaults to ``"LORA"``).
        optimizer_tensors: tensors from :func:`optimizer_to_tensors`.
        optimizer_meta: its JSON half, stored in ``optimizer.safetensors``' metadata.
        trainer_state: JSON-able dict (step, :func:`rng_state`, config).
        tokenizer_dir: a folder whose tokenizer files are copied in.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    config = {"peft_type": "LORA", **dict(adapter_config)}
    try:
        with atomic_directory(path) as tmp:
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
            save_file(_plain(adapter_tensors), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            if optimizer_tensors is not None or optimizer_meta is not None:
                meta = {"format": "pt", "optimizer": json.dumps(dict(optimizer_meta or {}))}
                save_file(_plain(optimizer_tensors or {}), str(tmp / OPTIMIZER), metadata=meta)
            if trainer_state is not None:
                (tmp / TRAINER_STATE).write_text(json.dumps(dict(trainer_state), indent=2), encoding="utf-8")
            if tokenizer_dir is not None:
                copy_tokenizer_files(tokenizer_dir, tmp)
    except (OSError, SafetensorError) as exc:
        # Disk full, a file-size limit, a read-only folder: the temporary copy is gone and
        # the previous checkpoint at `path` (if any) is untouched.
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: could not write the checkpoint ({reason}); free some disk space or choose "
                              "another folder; any previous checkpoint there is intact") from None
    return path


def copy_tokenizer_files(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer files found in ``src`` into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "checkpoint JSON", CheckpointError,
                            fix="the checkpoint is corrupt, use an earlier one")


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); it is truncated or "
                              "corrupt, use an earlier checkpoint") from None


def _directory(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    recover_directory(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory; check the path")
    return path


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter directory.

    Returns:
        (adapter_config dict, PEFT key -> tensor).

    Raises:
        CheckpointError: missing directory or files, bad JSON, corrupt safetensors, or an
            adapter that is not LoRA.
    """
    path = _directory(path)
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}; not a complete PEFT adapter directory")
    config = _read_json(path / ADAPTER_CONFIG)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}; "
                              "LEMA reads LoRA adapters only")
    tensors, _ = _read_tensors(path / ADAPTER_WEIGHTS)
    _check_finite(tensors, path / ADAPTER_WEIGHTS)
    return config, tensors


def _check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad} holds NaN or infinite values; the checkpoint is corrupt, "
                              "use an earlier one")


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint directory written by :func:`write_checkpoint` (or a PEFT adapter).

    An interrupted replacement is recovered first (see :mod:`lema.adapters.checkpoints.atomic`).

    Raises:
        CheckpointError: as :func:`read_adapter`, or a corrupt optimizer / trainer state.
    """
    config, tensors = read_adapter(path)
    path = Path(path)
    opt_tensors = opt_meta = state = None
    if (path / OPTIMIZER).is_file():
        opt_tensors, metadata = _read_tensors(path / OPTIMIZER)
        _check_finite(opt_tensors, path / OPTIMIZER)
        try:
            opt_meta = parse_json(metadata.get("optimizer", "{}"))
        except JsonValueError as exc:
            raise CheckpointError(f"{path / OPTIMIZER}: optimizer metadata is not valid JSON ({exc})") from None
        check_optimizer_meta(opt_meta, path / OPTIMIZER)
    if (path / TRAINER_STATE).is_file():
        state = _read_json(path / TRAINER_STATE)
        check_trainer_state(state, path / TRAINER_STATE)
    return Checkpoint(adapter_config=config, adapter_tensors=tensors, optimizer_tensors=opt_tensors,
                      optimizer_meta=opt_meta, trainer_state=state)


# --- optimizer state -----------------------------------------------------------------------

def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[where] = value
        return {"__tensor__": where}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {"__dict__": [[k, _encode(v, f"{where}.{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"optimizer state {where} holds a {type(value).__name__}, which LEMA cannot store "
                          "without pickle; use a torch.optim optimizer with tensor and number state")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            key = value["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(f"optimizer state: tensor {key!r} is missing from optimizer.safetensors")
            return tensors[key]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"]}
    return value


def optimizer_to_tensors(optimizer: torch.optim.Optimizer,
                         param_names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's ``state_dict()`` into safetensors-able tensors and JSON.

    Args:
        optimizer: e.g. ``torch.optim.AdamW``.
        param_names: one name per parameter, in the optimizer's order (param groups
            flattened); state tensors are keyed ``state.<name>.<key>``.

    Returns:
        (tensors, meta): store the tensors in safetensors and ``meta`` as JSON; together
        they restore the state bit for bit with :func:`load_optimizer_state`.
    """
    sd = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    if len(param_names) != n_params or len(set(param_names)) != n_params:
        raise CheckpointError(f"optimizer has {n_params} parameters but {len(param_names)} (distinct) names "
                              "were given; pass one unique name per parameter")
    tensors: dict[str, torch.Tensor] = {}
    state = {}
    for index, entry in sd["state"].items():
        name = param_names[index]
        state[name] = _encode(entry, f"state.{name}", tensors)
    groups = []
    for i, group in enumerate(sd["param_groups"]):
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({"params": [param_names[j] for j in group["params"]],
                       "hyper": _encode(hyper, f"group.{i}", tensors)})
    meta = {"format": OPTIMIZER_FORMAT, "class": type(optimizer).__name__, "param_names": list(param_names),
            "state": state, "param_groups": groups}
    return tensors, meta


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                         meta: Mapping[str, Any]) -> None:
    """Restore an optimizer from :func:`optimizer_to_tensors`'s output.

    The optimizer must have the same parameters, in the same order and under the same
    names, as the one saved.

    Raises:
        CheckpointError: another optimizer class, format, or parameter list.
    """
    check_optimizer_meta(meta, "optimizer state")
    if meta.get("format") != OPTIMIZER_FORMAT:
        raise CheckpointError(f"optimizer state format {meta.get('format')!r} is not {OPTIMIZER_FORMAT!r}")
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"optimizer state is for {meta.get('class')}, not {type(optimizer).__name__}; "
                              "resume with the same optimizer")
    names = list(meta["param_names"])
    current = optimizer.state_dict()
    sizes = [len(g["params"]) for g in current["param_groups"]]
    if sizes != [len(g["params"]) for g in meta["param_groups"]]:
        raise CheckpointError(f"optimizer has parameter groups of sizes {sizes}, the checkpoint "
                              f"{[len(g['params']) for g in meta['param_groups']]}; build it the same way")
    index = {name: i for i, name in enumerate(names)}
    try:
        state = {index[name]: _decode(entry, tensors) for name, entry in meta["state"].items()}
        hypers = [_decode(group["hyper"], tensors) for group in meta["param_groups"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"optimizer state is malformed ({type(exc).__name__}: {str(exc)[:120]}); "
                              "the checkpoint is corrupt, use an earlier one") from None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, entry in state.items():
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
            # Per-parameter state (exp_avg, ...) has the parameter's shape; `step` is a scalar.
            if isinstance(value, torch.Tensor) and value.dim() > 0 and i < len(params) \
                    and value.shape != params[i].shape:
                raise CheckpointError(f"optimizer state {names[i]}.{key} has shape {list(value.shape)}, the "
                                      f"parameter {list(params[i].shape)}; the checkpoint is for another adapter")
    if not all(isinstance(h, dict) for h in hypers):
        raise CheckpointError("optimizer state: a parameter group's hyperparameters are not an object")
    check_hyperparameters(hypers, current["param_groups"], "optimizer state")
    groups = []
    for group, hyper in zip(meta["param_groups"], hypers):
        groups.append({**hyper, "params": [index[n] for n in group["params"]]})
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"optimizer state does not fit this optimizer ({str(exc).splitlines()[0][:160]}); "
                              "the checkpoint is corrupt or for another run") from None


# --- RNG state -----------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA) and Python ``random`` RNG states, as JSON-able values."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")

    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": b64(torch.get_rng_state()),
                             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    def unb64(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()

    try:
        torch.set_rng_state(unb64(state["torch"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"trainer_state.json: RNG state is malformed ({exc}); the checkpoint is corrupt") from None
