"""Find a model's files (local folder or Hugging Face Hub) and read its tensors one by one.

Safetensors shards are read with ``pread`` at the offsets of their (validated) headers, so
only the tensor being read occupies memory. ``.bin`` files are read only through
``torch.load(weights_only=True, mmap=True)``: the restricted unpickler refuses anything but
tensors and plain containers, so a malicious pickle cannot run code.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import torch

from lema.adapters.json_files import read_json_object
from lema.adapters.weights.safetensors_header import read_header
from lema.adapters.weights.shard_index import read_weight_map
from lema.domain.model.spec import torch_dtype
from lema.errors import ModelFormatError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_COMMON = ["config.json", "generation_config.json", *TOKENIZER_FILES]
SAFETENSORS_PATTERNS = [*_COMMON, "*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = [*_COMMON, "pytorch_model*.bin", "pytorch_model.bin.index.json"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")


def looks_like_repo_id(ref: str) -> bool:
    """True for ``name`` or ``owner/name`` (no absolute path, no ``..``)."""
    return bool(_REPO_ID.match(ref)) and ".." not in ref


def resolve_model(ref: str | os.PathLike[str], revision: str | None = None, token: str | None = None) -> Path:
    """A local folder holding ``config.json`` and the weights of ``ref``.

    Args:
        ref: a local folder, or a Hugging Face Hub id (``"NousResearch/Llama-2-7b-hf"``),
            downloaded (or found in the cache; ``HF_HUB_OFFLINE=1`` is honoured) with only
            the config, tokenizer and weight files, safetensors preferred over ``.bin``.
        revision: Hub branch, tag or commit.
        token: Hub token for gated or private repos (default: the logged-in token).

    Raises:
        ModelFormatError: not a folder and not a reachable Hub repo (no network, not
            found, gated), with what to do about it.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelFormatError(f"{path}: is a file; pass the folder holding config.json and the weights")
    text = str(ref)
    if not looks_like_repo_id(text):
        raise ModelFormatError(f"{text}: no such folder, and not a Hugging Face Hub id (owner/name); check the path")
    return _download(text, revision, token)


def _download(repo_id: str, revision: str | None, token: str | None) -> Path:
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    try:
        patterns = SAFETENSORS_PATTERNS
        if not _offline():
            files = hf.list_repo_files(repo_id, revision=revision, token=token)
            if not any(f.endswith(".safetensors") for f in files):
                patterns = BIN_PATTERNS
        folder = Path(hf.snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
        if patterns is SAFETENSORS_PATTERNS and not any(folder.glob("*.safetensors")):
            folder = Path(hf.snapshot_download(repo_id, revision=revision, token=token, allow_patterns=BIN_PATTERNS))
    except hf_errors.GatedRepoError:
        raise ModelFormatError(
            f"{repo_id}: the repo is gated; accept its licence on huggingface.co and log in "
            "(`hf auth login`) or pass --token") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelFormatError(
            f"{repo_id}: not a local folder, and no such repo on the Hugging Face Hub (or it is private: "
            "log in or pass --token); check the name") from None
    except hf_errors.RevisionNotFoundError:
        raise ModelFormatError(f"{repo_id}: revision {revision!r} not found; check --revision") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise ModelFormatError(
            f"{repo_id}: not a local folder, and not in the Hugging Face cache while the Hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1); connect once, or pass a local folder") from None
    except (hf_errors.HfHubHTTPError, hf_errors.HTTPError, hf_errors.HFValidationError, OSError) as exc:
        raise ModelFormatError(f"{repo_id}: could not download from the Hugging Face Hub ({exc}); "
                               "check the name and your network, or pass a local folder") from None
    if not (folder / "config.json").is_file():
        raise ModelFormatError(f"{repo_id}: the repo has no config.json; is it a transformers model?")
    return folder


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def read_config_text(folder: str | os.PathLike[str]) -> str:
    """The text of ``folder/config.json``, checked to be a JSON object."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder}: no config.json; pass a transformers model folder")
    read_json_object(path, "config", ModelFormatError, fix="re-download it")
    return path.read_text(encoding="utf-8")


class TensorLoader:
    """Reads the tensors of one checkpoint folder, one at a time.

    Attributes:
        meta: name -> (torch dtype, shape) of every tensor, known without reading data.
    """

    def __init__(self, folder: Path, files: dict[str, str], meta: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 offsets: dict[str, int]) -> None:
        self.folder = folder
        self._files = files
        self.meta = meta
        self._offsets = offsets
        self._bins: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor for safetensors; mmap-backed for ``.bin``)."""
        file = self._files[name]
        if file.endswith(".bin"):
            return self._bin(file)[name]
        dtype, shape = self.meta[name]
        nbytes = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            nbytes *= s
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(nbytes)
        with open(self.folder / file, "rb") as f:
            f.seek(self._offsets[name])
            if f.readinto(buf) != nbytes:
                raise ModelFormatError(f"{self.folder / file}: truncated while reading {name}; re-download it")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def iter(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``names`` (default: all, in file order)."""
        for name in self.meta if names is None else names:
            yield name, self.get(name)

    def _bin(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._bins:
            self._bins.clear()  # keep one .bin mapped at a time
            self._bins[file] = load_bin(self.folder / file)
        return self._bins[file]


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` a ``.bin`` state dict safely (weights_only, mmap'd, never code).

    Raises:
        ModelFormatError: the pickle holds anything but tensors and plain containers
            (refused for safety), or the file is not a torch checkpoint.
    """
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (non-zip) .bin files cannot be mmap'd; they are still unpickled safely.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFormatError(
            f"{path}: refused for safety: the pickle holds more than tensors and torch.load(weights_only=True) "
            f"rejects it ({str(exc).splitlines()[0]}); use the repo's .safetensors weights or a trusted source") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise ModelFormatError(f"{path}: not a readable PyTorch checkpoint ({exc}); re-download it") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFormatError(f"{path}: not a state dict of tensors")
    return state


def iter_checkpoint_tensors(folder: str | os.PathLike[str]) -> tuple[list[str], TensorLoader]:
    """List the tensors of a transformers checkpoint folder and read them one at a time.

    Handles ``model.safetensors``, sharded safetensors (``*.safetensors.index.json``),
    ``pytorch_model.bin`` and sharded ``.bin`` (``pytorch_model.bin.index.json``); safetensors
    win when both are present.

    Example:
        >>> names, loader = iter_checkpoint_tensors("tiny-llama")  # doctest: +SKIP
        >>> for name, tensor in loader.iter(names): ...

    Returns:
        (names in file order, a :class:`TensorLoader`).

    Raises:
        ModelFormatError: no weights, an index naming missing shards, a corrupt file, or a
            ``.bin`` refused for safety.
    """
    folder = Path(folder)
    files: dict[str, str] = {}
    meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    offsets: dict[str, int] = {}
    st_index = sorted(folder.glob("*.safetensors.index.json"))
    st_files = sorted(p.name for p in folder.glob("*.safetensors"))
    named: set[str] = set()
    if st_index:
        weight_map = read_weight_map(st_index[0])
        named = set(weight_map)
        shards = sorted(set(weight_map.values()))
    elif st_files:
        shards = ["model.safetensors"] if "model.safetensors" in st_files else st_files[:1]
    else:
        shards = []
    if shards:
        for shard in shards:
            header = read_header(folder / shard)
            for name, entry in sorted(header.tensors.items(), key=lambda kv: kv[1]["start"]):
                files[name] = shard
                meta[name] = (torch_dtype(entry["dtype"]), tuple(entry["shape"]))
                offsets[name] = entry["start"]
        missing = sorted(named - set(files))
        if missing:
            raise ModelFormatError(f"{st_index[0]}: {len(missing)} tensors in the index are in no shard, "
                                   f"e.g. {missing[0]}; re-download the model")
        return list(files), TensorLoader(folder, files, meta, offsets)
    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        bins = sorted(set(read_weight_map(bin_index).values()))
    elif (folder / "pytorch_model.bin").is_file():
        bins = ["pytorch_model.bin"]
    else:
        raise ModelFormatError(
            f"{folder}: no weights (model.safetensors, *.safetensors.index.json, pytorch_model.bin or "
            "pytorch_model.bin.index.json); pass a transformers model folder")
    for shard in bins:
        if not (folder / shard).is_file():
            raise ModelFormatError(f"{folder}: shard {shard} named by the index is missing; re-download it")
        for name, t in load_bin(folder / shard).items():
            files[name] = shard
            meta[name] = (t.dtype, tuple(t.shape))
    return list(files), TensorLoader(folder, files, meta, offsets)


__all__ = ["BIN_PATTERNS", "SAFETENSORS_PATTERNS", "TOKENIZER_FILES", "TensorLoader",
           "iter_checkpoint_tensors", "load_bin", "looks_like_repo_id", "read_config_text", "resolve_model"]
