"""What a command-line run opens from its arguments: the model path, the tokenizer, and the
cache where ``.bin`` folders are converted once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

from lema.errors import ConfigError, ModelFormatError


def cache_dir() -> Path:
    """Where converted models are kept: ``$LEMA_CACHE`` or ``~/.cache/lema``."""
    return Path(os.environ.get("LEMA_CACHE") or Path.home() / ".cache" / "lema").expanduser()


def check_model_path(model: str) -> None:
    """A ``--model`` that names nothing, said before anything slow (torch is not imported yet).

    Raises:
        ModelFormatError: no such file or folder.
    """
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelFormatError(f"--model: {model}: no such file or folder; pass a converted .safetensors file "
                               "or a Hugging Face model folder")


def resolve_model_arg(model: str, echo: Callable[[str], None] = print) -> tuple[str | None, str | None]:
    """``--model`` -> ``(gbi_path, model_name_or_path)`` for LemaConfig.

    A ``.safetensors`` file is used as is (its folder supplies config and tokenizer when
    its metadata has none); a folder of safetensors weights is read directly; a folder with
    only ``.bin`` weights is converted once into the cache (see :func:`cache_dir`).
    """
    # Absolute paths: they are stored in checkpoints, which may be loaded from anywhere.
    path = Path(model).expanduser().absolute()
    if path.is_file():
        folder = path.parent
        return str(path), (str(folder) if (folder / "config.json").is_file() else None)
    if not path.is_dir():
        raise ModelFormatError(f"--model: {model}: no such file or folder; pass a converted .safetensors file "
                               "or a Hugging Face model folder")
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return None, str(path)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins and (path / "config.json").is_file():
        return str(_converted(path, bins, echo)), str(path)
    return None, str(path)  # let the model resolution explain what is missing


def _converted(folder: Path, bins: list[Path], echo: Callable[[str], None]) -> Path:
    from lema.app.tools.convert import prepare_monolithic_safetensors

    key = hashlib.sha256(str(folder.resolve()).encode())
    for f in [folder / "config.json", *bins, *folder.glob("pytorch_model.bin.index.json")]:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = cache_dir() / f"{key.hexdigest()[:20]}.safetensors"
    if not out.is_file():
        echo(f"converting {folder} (.bin weights) once into {out} ...")
        prepare_monolithic_safetensors(str(folder), out, device="cpu")
    return out


def open_tokenizer(tokenizer: str | None, model: str) -> tuple[Any, Path | None]:
    """The tokenizer named by ``--tokenizer``, else the one in (or beside) ``--model``.

    Returns ``(tokenizer, folder)``; the folder is copied into every checkpoint.
    """
    from lema.data.tokenizer import find_tokenizer_dir, load_tokenizer

    if tokenizer is not None:
        p = Path(tokenizer).expanduser()
        return load_tokenizer(p), (p if p.is_dir() else None)
    folder = find_tokenizer_dir(model)
    if folder is None:
        from lema.data.tokenizer import sidecar_dir

        where = Path(model).expanduser()
        where = f"{sidecar_dir(where)} or {where.parent}" if where.is_file() else str(where)
        raise ConfigError(f"no tokenizer found in {where} (looked for tokenizer.json, tokenizer.model, vocab.json); "
                          "pass the model's tokenizer folder with --tokenizer")
    return load_tokenizer(folder), folder


def save_tokenizer_with_template(tokenizer: Any, chat_template: str, folder: Path) -> Path:
    """Save ``tokenizer`` with the ``--chat-template`` it trained with into ``folder`` (the
    run's ``OUT/tokenizer``), so that checkpoints carry that template."""
    from lema.data.chat import resolve_template

    tokenizer.chat_template = resolve_template(tokenizer, chat_template)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return folder
