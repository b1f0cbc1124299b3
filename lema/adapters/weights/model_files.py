"""Turn what a user names as a model into a :class:`ModelSpec`, reading headers only.

``resolve_model(ref)`` accepts a ``.safetensors`` file, a ``model.safetensors.index.json``,
a Hugging Face folder, a bare ``config.json``, a built-in name (``llama-2-70b``) or, when
the network is allowed, a Hub id whose ``config.json`` alone is fetched. It never reads a
weight byte and never unpickles anything, so it answers in milliseconds for any size of
model. (It deliberately does not import torch: ``lema plan`` must start fast.)

Example:
    >>> resolve_model("llama-2-7b").spec.n_layers
    32
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import attrs

from lema.adapters.json_files import json_kind, read_json_object
from lema.adapters.weights.builtin_models import builtin_config, find_builtin
from lema.adapters.weights.safetensors_header import read_header
from lema.adapters.weights.shard_index import read_sharded
from lema.domain.json_values import JsonValueError, parse_json
from lema.domain.model.spec import ModelSpec
from lema.errors import ModelFormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")
_CONVERT = "convert it with `lema convert MODEL OUT.safetensors` (reads .bin safely, weights only)"


@attrs.frozen
class ResolvedModel:
    """A model LEMA can plan (and, with weights, train).

    Attributes:
        spec: the model's spec (tensor offsets filled when there are weights).
        weights_path: the ``.safetensors`` file, or the folder of a sharded model; None when
            only a config is known.
        root: the folder the spec's tensor ``file`` fields are relative to, or None.
        source_kind: ``"safetensors"``, ``"sharded"``, ``"config"``, ``"builtin"``, ``"hub"``
            or ``"folder"`` (a folder without safetensors weights).
        config: the ``config.json`` dict.
        note: a remark for the user (e.g. the weights need ``lema convert``), or "".
    """

    spec: ModelSpec
    weights_path: Path | None
    root: Path | None
    source_kind: str
    config: dict[str, Any]
    note: str = ""


def looks_like_hub_id(ref: str) -> bool:
    """True for ``owner/name`` strings that are not paths (no ``..``, not absolute)."""
    return bool(_REPO_ID.match(ref)) and ".." not in ref


def resolve_model(ref: str, config_path: str | None = None, allow_network: bool = True) -> ResolvedModel:
    """Resolve ``ref`` into a spec without reading weights.

    Args:
        ref: a path (file or folder), a built-in name or a Hub id.
        config_path: a ``config.json`` to use instead of the one the model carries.
        allow_network: allow fetching a Hub id's ``config.json``.

    Raises:
        ModelFormatError: missing path, corrupt or pickle file, unknown architecture, weights
            that do not match the config, or an unreachable Hub id; always with the fix.
    """
    override = _load_json(Path(config_path).expanduser(), "config") if config_path else None
    path = Path(ref).expanduser()
    if path.is_dir():
        return _folder(path, override)
    if path.is_file():
        return _file(path, override)
    name = find_builtin(ref)
    if name is not None:
        config = override or builtin_config(name)
        return ResolvedModel(ModelSpec.from_config(config), None, None, "builtin", config)
    # "owner/name" that is not a file name under an existing folder: a Hub id.
    hub_like = (looks_like_hub_id(ref) and not path.parent.is_dir()
                and not ref.lower().endswith((".safetensors", ".json", *PICKLE_SUFFIXES)))
    if hub_like:
        if allow_network:
            config = override or _hub_config(ref)
            return ResolvedModel(ModelSpec.from_config(config), None, None, "hub", config)
        raise ModelFormatError(f"{ref}: no such file, and the network is off so the Hub id cannot be looked up; "
                               "pass a local path or --config config.json")
    raise ModelFormatError(f"{ref}: no such file or folder; check the path (or use a built-in name: "
                           "see `lema plan --list-models`)")


def _file(path: Path, override: dict[str, Any] | None) -> ResolvedModel:
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise ModelFormatError(f"{path}: pickle checkpoints are never loaded directly (unpickling can run code); "
                               + _CONVERT)
    if name.endswith(".safetensors"):
        header = read_header(path)
        config = override or _metadata_config(path, header.metadata) or _beside(path)
        spec = ModelSpec.from_header(header.tensors, config)
        return ResolvedModel(spec, path, path.parent, "safetensors", config)
    if name.endswith(".index.json"):
        return _sharded(path, override)
    if name.endswith(".json"):
        data = _load_json(path, "config")
        if "weight_map" in data:
            return _sharded(path, override)
        config = override or data
        return ResolvedModel(ModelSpec.from_config(config), None, None, "config", config)
    raise ModelFormatError(f"{path}: not a model file LEMA reads; pass a .safetensors file, a "
                           "model.safetensors.index.json, a config.json or a Hugging Face folder")


def _sharded(index: Path, override: dict[str, Any] | None) -> ResolvedModel:
    tensors, metadata = read_sharded(index)
    config = override or _metadata_config(index, metadata) or _beside(index)
    return ResolvedModel(ModelSpec.from_header(tensors, config), index.parent, index.parent, "sharded", config)


def _folder(folder: Path, override: dict[str, Any] | None) -> ResolvedModel:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return _sharded(index, override)
    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return _file(files[0], override)
    if len(files) > 1:
        raise ModelFormatError(f"{folder}: {len(files)} .safetensors files but no model.safetensors.index.json; "
                               "pass one file or add the index")
    config = override or _beside(folder / "config.json")
    pickles = [p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES)]
    note = (f"the weights are pickle files ({', '.join(sorted(pickles)[:3])}); training needs them converted: "
            + _CONVERT) if pickles else "the folder has no weights: planning from config.json only"
    return ResolvedModel(ModelSpec.from_config(config), None, folder, "folder", config, note)


def _metadata_config(path: Path, metadata: dict[str, str]) -> dict[str, Any] | None:
    text = metadata.get("config")
    if not text:
        return None
    try:
        config = parse_json(text)
    except JsonValueError as exc:
        raise ModelFormatError(f"{path}: the config in the file's metadata is not valid ({exc}); "
                               "re-convert the model or pass --config config.json") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path}: the config in the file's metadata is {json_kind(config)}, not a JSON object; "
                               "re-convert the model or pass --config config.json")
    return config


def _beside(path: Path) -> dict[str, Any]:
    config = path.parent / "config.json" if path.name != "config.json" else path
    if not config.is_file():
        raise ModelFormatError(f"{path}: no config found (none in the file's metadata and no {config}); "
                               "pass --config path/to/config.json")
    return _load_json(config, "config")


def _load_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, what, ModelFormatError, fix="re-download it or pass --config config.json")


def _hub_config(repo_id: str) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(repo_id, "config.json")
    except Exception as exc:  # noqa: BLE001 - any failure of the Hub means the same to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFormatError(f"{repo_id}: not a local path and the Hugging Face Hub could not be reached or has "
                               f"no such repo ({type(exc).__name__}: {reason[:160]}); pass a local path or "
                               "--config config.json") from None
    return _load_json(Path(local), "config")


def default_environment_allows_network() -> bool:
    """False when ``HF_HUB_OFFLINE`` is set (the Hub's own switch)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on")
