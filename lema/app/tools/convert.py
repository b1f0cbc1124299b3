"""Convert a Hugging Face model into the one ``.safetensors`` file LEMA streams from.

Example:
    >>> from lema.utils.model_utils import prepare_monolithic_safetensors
    >>> prepare_monolithic_safetensors("NousResearch/Llama-2-7b-hf", "llama2_7b.safetensors",
    ...                                device="auto")  # doctest: +SKIP
    PosixPath('llama2_7b.safetensors')
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from lema.adapters.weights.hub import (
    iter_checkpoint_tensors,
    read_config_text,
    resolve_model,
)
from lema.adapters.weights.safetensors_writer import code_of, open_safetensors_writer
from lema.app.outputs import check_output, folder_files
from lema.app.tools.quantize import plan_quantized, write_quantized
from lema.domain.families import registry as arch
from lema.domain.model.finite import is_finite
from lema.domain.nn.quant import QuantFormat
from lema.domain.model.spec import ModelSpec, output_dtype
from lema.errors import ConfigError, ModelFormatError, OutputError

Progress = Callable[[int, int, str], None]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given (validated)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a device; use 'auto', 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available; use 'auto' or 'cpu'")
    return resolved


def _packed_names(names: list[str]) -> bool:
    """True when a checkpoint's tensor names include packed (quantized) weights."""
    return any(".quant_state.bitsandbytes__" in n or n.endswith(".SCB") for n in names)


def plan_tensors(names: list[str], config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Which tensors the converted file holds, in order, and where each comes from (pure).

    Returns ``(output name, source name)`` pairs: every expected tensor in unit order (both
    names of a tied embedding/head, the missing one cloned from the other), then any other
    source tensor, minus non-weight buffers (a tensor the family does not use is then
    refused by :meth:`ModelSpec.from_header`, before anything is written).
    """
    kept = [n for n in names if not arch.is_ignored(n)]
    present = set(kept)
    expected = arch.expected_tensors(config, present)
    source: dict[str, str] = {n: n for n in kept}
    for e in expected:
        have = [n for n in e.names if n in present]
        if len(e.names) > 1 and have:
            for name in e.names:
                source.setdefault(name, have[0])
    order: list[str] = []
    for e in expected:
        order += [n for n in e.names if n in source and n not in order]
    seen = set(order)
    order += [n for n in kept if n not in seen]
    return [(n, source[n]) for n in order]


def prepare_monolithic_safetensors(
    model: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    overwrite: bool = True,
    quantize: str | None = None,
    double_quant: bool = True,
) -> Path:
    """Write ``model``'s weights as one self-describing ``.safetensors`` file.

    Streams tensor by tensor (peak RAM near the largest tensor), clones tied weights so
    both the embedding and ``lm_head.weight`` are present, drops non-weight buffers, and
    stores ``config.json`` in the file's metadata (keys ``config``, ``format``,
    ``lema_version``). The file appears at ``out_path`` only when complete (it is written
    as a temporary file beside it and renamed); a temporary file a killed conversion left
    there is deleted first.

    Args:
        model: a local transformers folder or a Hugging Face Hub id.
        out_path: the ``.safetensors`` file to write (replaced atomically).
        device: where dtype conversion runs: ``"auto"`` (CUDA if available), ``"cpu"``,
            ``"cuda"``.
        dtype: convert floating tensors to this (``"float16"``, ``"bfloat16"``,
            ``"float32"``); None keeps each tensor's dtype.
        revision: Hub revision.
        token: Hub token.
        progress: called as ``progress(done, total, name)`` after each tensor.
        overwrite: replace an existing file at ``out_path`` (the guide's behaviour, the
            default here; ``lema convert`` refuses unless ``--overwrite``). Writing into the
            model's own folder or over one of its files is always refused.
        quantize: ``"nf4"``, ``"fp4"`` or ``"int8"``: store the decoder layers' linear weights
            as transformers + bitsandbytes do (``BitsAndBytesConfig``), quantized from
            ``dtype`` (or their own dtype), so the file streams a quarter (int8: half) of
            the bytes and transformers loads it too. Needs ``pip install 'lema[quant]'``.
        double_quant: with nf4/fp4, also quantize the block scales (QLoRA's default).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ModelFormatError: unknown architecture, missing or mis-shaped tensors, unreadable or
            unsafe weights, Hub failures.
        ConfigError: a bad ``dtype``, ``device`` or ``quantize``; a model already quantized.
        OutputError: ``out_path`` is inside the model's folder or one of its files, or
            exists and ``overwrite`` is False.
    """
    out = Path(out_path)
    if out.is_dir():
        raise ModelFormatError(f"{out}: is a folder; pass a file name ending in .safetensors")
    local = Path(model).expanduser()
    if local.is_dir():  # checked before any download or read
        check_output(out, option="OUT", folders=[local], files=folder_files(local), overwrite=overwrite)
    fmt = None if quantize is None else QuantFormat.parse(quantize, double_quant)
    target = output_dtype(dtype)
    dev = resolve_device(device)
    folder = resolve_model(model, revision=revision, token=token)
    check_output(out, option="OUT", folders=[folder], files=folder_files(folder), overwrite=overwrite)
    check_tokenizer_beside(out, folder, overwrite)
    config_text = read_config_text(folder)
    config = json.loads(config_text)
    names, loader = iter_checkpoint_tensors(folder)
    plan = plan_tensors(names, config)

    # The tensors of packed (already quantized) weights keep their dtypes.
    stored: set[str] = set()
    if _packed_names(names):
        header = {n: {"dtype": code_of(loader.meta[s][0]), "shape": list(loader.meta[s][1])} for n, s in plan}
        source = ModelSpec.from_header(header, config)
        stored = {t.name for u in source.units for t in u.tensors if t.key in u.stored_keys}

    def out_dtype(name: str, src: str) -> torch.dtype:
        d = loader.meta[src][0]
        return target if target is not None and d.is_floating_point and name not in stored else d

    entries = [(name, out_dtype(name, src), loader.meta[src][1]) for name, src in plan]
    # Validate names and shapes against the config before writing a byte.
    spec = ModelSpec.from_header({n: {"dtype": code_of(d), "shape": list(s)} for n, d, s in entries}, config)
    from lema import __version__

    layout = None if fmt is None else plan_quantized(spec, entries, fmt, str(model))
    if layout is not None:
        config_text = json.dumps(layout.config)
    metadata = {"format": "pt", "config": config_text, "lema_version": __version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing_output(out), open_safetensors_writer(out, entries if layout is None else layout.entries, metadata,
                                                      () if layout is None else layout.tail) as writer:
        for done, ((name, src), (_, want, _)) in enumerate(zip(plan, entries), start=1):
            tensor = loader.get(src)
            if not is_finite(tensor):
                raise ModelFormatError(f"{folder}: tensor {src} holds NaN or infinite values; the model is corrupt "
                                       f"(nothing was written to {out}): re-download it")
            if layout is not None and name in layout.weights:
                write_quantized(writer, layout, name, tensor, fmt, dev)  # type: ignore[arg-type]
            else:
                # Converted chunk by chunk (on the GPU with device="cuda"), never whole.
                writer.write(name, tensor, cast=True,
                             device=dev if tensor.dtype != want and dev.type != "cpu" else None)
            del tensor
            if progress is not None:
                progress(done, len(plan), name)
        # The tokenizer folder is swapped in while the model file is still a complete
        # temporary one, renamed last: a failure anywhere leaves neither new output.
        write_tokenizer_beside(folder, out)
    return out


@contextlib.contextmanager
def writing_output(out: Path) -> Iterator[None]:
    """Name the output (not an input, not "a file") when writing it fails: a full disk, a
    file-size limit, a read-only folder.

    Raises:
        OutputError: an OSError while the block writes ``out`` (or the files beside it).
    """
    try:
        yield
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and exc.errno is None:
            raise
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        fix = ("free some disk space or write elsewhere" if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
               else "check the folder's permissions or write elsewhere")
        raise OutputError(f"{out}: could not write it ({reason}); {fix}; nothing was written there and any "
                          "previous file is intact") from None


def check_tokenizer_beside(model_file: Path, source: str | os.PathLike[str] | None, overwrite: bool) -> None:
    """Refuse to write ``model_file``'s tokenizer folder (``X.tokenizer/``) over an input or
    over an existing non-empty folder without ``overwrite`` (checked before any writing)."""
    from lema.data.tokenizer import sidecar_dir

    check_output(sidecar_dir(model_file), option="the tokenizer folder beside OUT", folders=[source],
                 overwrite=overwrite, replaces_folder=True)


def write_tokenizer_beside(source: str | os.PathLike[str] | None, model_file: Path) -> Path | None:
    """Copy the tokenizer files of folder ``source`` into ``model_file``'s tokenizer folder
    (``X.tokenizer/``, replaced atomically); None when ``source`` holds none."""
    from lema.adapters.checkpoints.atomic import atomic_directory
    from lema.adapters.checkpoints.store import copy_tokenizer_files
    from lema.adapters.weights.hub import TOKENIZER_FILES
    from lema.data.tokenizer import sidecar_dir

    if source is None or not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        return None
    target = sidecar_dir(model_file)
    with atomic_directory(target) as tmp:
        copy_tokenizer_files(source, tmp)
    return target
