"""Merge a LoRA adapter into its base weights: ``W' = W + scaling * (B @ A)``.

Streams tensor by tensor (peak RAM near the largest tensor). Deltas are computed in fp32
and cast to the output dtype; GPT-2's Conv1D weights (and any adapter saved with
``fan_in_fan_out``) are stored ``[in, out]``, so their delta is transposed. Nothing is
written if any merged weight is non-finite or any adapter key matches no base weight.

Example:
    >>> merge_adapter("llama.safetensors", "checkpoints/run1", "merged", hf_folder=True)  # doctest: +SKIP
    PosixPath('merged')
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from lema.adapters.checkpoints.atomic import atomic_directory
from lema.adapters.checkpoints.store import copy_tokenizer_files, read_adapter
from lema.adapters.weights.hub import (
    TensorLoader,
    iter_checkpoint_tensors,
    read_config_text,
)
from lema.adapters.weights.safetensors_header import read_header
from lema.adapters.weights.safetensors_writer import code_of, open_safetensors_writer
from lema.app.tools.convert import plan_tensors, write_tokenizer_beside, writing_output
from lema.app.outputs import check_output, folder_files
from lema.app.tools.quantize import dequantized_base
from lema.domain.families import registry as arch
from lema.domain.json_values import JsonValueError, is_finite_number, parse_json
from lema.domain.model.finite import is_finite
from lema.domain.model.spec import ModelSpec, output_dtype, torch_dtype
from lema.errors import CheckpointError, ConfigError, ModelFormatError

Progress = Callable[[int, int, str], None]
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class _Pair:
    def __init__(self) -> None:
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT matches rank_pattern/alpha_pattern keys as a suffix regex of the module name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def lora_deltas(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Base weight name -> (A, B, scaling) for every LoRA pair of a PEFT adapter.

    Raises:
        CheckpointError: keys that are not LoRA A/B weights, unpaired or mis-shaped pairs,
            or unsupported variants (DoRA, LoRA biases).
    """
    if config.get("use_dora"):
        raise CheckpointError("adapter uses DoRA (use_dora=true), which LEMA cannot merge; merge it with peft")
    patterns, use_rslora = _checked_options(config)
    pairs: dict[str, _Pair] = {}
    unknown = []
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        pair = pairs.setdefault(m["module"], _Pair())
        setattr(pair, m["ab"].lower(), t)
    if unknown:
        raise CheckpointError(f"adapter has {len(unknown)} keys that are not LoRA A/B weights "
                              f"(e.g. {unknown[0]!r}; modules_to_save and LoRA biases are not supported)")
    out = {}
    for module, pair in pairs.items():
        if pair.a is None or pair.b is None or pair.a.ndim != 2 or pair.b.ndim != 2 or pair.a.shape[0] != pair.b.shape[1]:
            raise CheckpointError(f"adapter module {module}: lora_A and lora_B are missing or their shapes disagree")
        r = pair.a.shape[0]
        if r == 0:
            raise CheckpointError(f"adapter module {module}: rank 0 (empty lora_A); the adapter is corrupt")
        alpha = _pattern_value(patterns, module, config.get("lora_alpha", r))
        if not is_finite_number(alpha) or alpha <= 0:
            raise CheckpointError(f"adapter_config.json: lora_alpha for {module} is {alpha!r}; it must be a "
                                  "finite number > 0")
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        out[module + ".weight"] = (pair.a, pair.b, float(scaling))
    return out


def _checked_options(config: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``alpha_pattern`` (module pattern -> alpha) and ``use_rslora``, checked."""
    patterns = config.get("alpha_pattern") or {}
    use_rslora = config.get("use_rslora") or False
    problems = []
    if not isinstance(patterns, dict):
        problems.append(f"alpha_pattern={patterns!r} must be an object of module pattern -> alpha")
        patterns = {}
    for key in patterns:
        try:
            re.compile(key)
        except re.error as exc:
            problems.append(f"alpha_pattern key {key!r} is not a valid pattern ({exc})")
    if not isinstance(use_rslora, bool):
        problems.append(f"use_rslora={use_rslora!r} must be true or false")
    if not isinstance(config.get("fan_in_fan_out") or False, bool):
        problems.append(f"fan_in_fan_out={config.get('fan_in_fan_out')!r} must be true or false")
    if problems:
        raise CheckpointError("adapter_config.json: " + "; ".join(problems))
    return patterns, use_rslora


class _MonolithicSource:
    """A LEMA ``.safetensors`` file as a TensorLoader (config read from its metadata)."""

    def __init__(self, path: Path) -> None:
        header = read_header(path)
        if "config" not in header.metadata:
            raise ModelFormatError(f"{path}: no config in the file's metadata; re-create it with `lema convert` "
                                   "or pass the transformers model folder as --base")
        self.config_text = header.metadata["config"]
        try:
            if not isinstance(parse_json(self.config_text), dict):
                raise JsonValueError("not a JSON object")
        except JsonValueError as exc:
            raise ModelFormatError(f"{path}: the config in the file's metadata is not valid ({exc}); "
                                   "re-create the file with `lema convert`") from None
        ordered = sorted(header.tensors.items(), key=lambda kv: kv[1]["start"])
        self.names = [n for n, _ in ordered]
        self.loader = TensorLoader(path.parent, {n: e["file"] for n, e in ordered},
                                   {n: (torch_dtype(e["dtype"]), tuple(e["shape"])) for n, e in ordered},
                                   {n: e["start"] for n, e in ordered})


def _open_base(base: Path) -> tuple[str, list[str], TensorLoader]:
    if base.is_dir():
        names, loader = iter_checkpoint_tensors(base)
        return read_config_text(base), names, loader
    if base.is_file():
        src = _MonolithicSource(base)
        return src.config_text, src.names, src.loader
    raise ModelFormatError(f"{base}: no such file or folder; pass a LEMA .safetensors file or a model folder")


def merge_adapter(
    base: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    hf_folder: bool = False,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> Path:
    """Write base + LoRA as a plain model, tensor by tensor.

    Args:
        base: a LEMA monolithic ``.safetensors`` (config in its metadata) or a transformers
            model folder; a quantized one (NF4/FP4/int8) is dequantized weight by weight, and
            the merged model is dense, in the dtype of the base's unquantized tensors unless
            ``dtype`` says otherwise.
        adapter_dir: a PEFT LoRA directory (``adapter_config.json`` +
            ``adapter_model.safetensors``), e.g. a LEMA checkpoint.
        out: a ``.safetensors`` file (default), or with ``hf_folder`` a folder that
            ``AutoModelForCausalLM.from_pretrained`` loads.
        dtype: output dtype of floating tensors (default: each base tensor's own).
        hf_folder: write ``model.safetensors`` + ``config.json`` (+ tokenizer files) with
            transformers' naming (a tied ``lm_head.weight`` is left out).
        tokenizer_dir: a folder whose tokenizer files are copied into the output (into the
            folder with ``hf_folder``, else beside the file as ``X.tokenizer/``); default:
            the adapter's folder (checkpoints carry the tokenizer they trained with), else
            the base's.
        progress: called as ``progress(done, total, name)`` after each tensor.
        overwrite: replace an existing non-empty ``out`` (else :class:`OutputError`).

    Returns:
        ``out`` as a Path.

    Raises:
        CheckpointError: an unreadable adapter, adapter keys matching no base weight, shape
            mismatches, or non-finite merged weights (nothing is written).
        ModelFormatError: an unreadable base model.
        OutputError: ``out`` is, lies inside or (a folder) contains the base, the adapter or
            the tokenizer folder, or it exists and ``overwrite`` is False.
    """
    base, out = Path(base), Path(out)
    folders = [base if base.is_dir() else None, Path(adapter_dir), tokenizer_dir]
    files = [base if base.is_file() else None, *folder_files(adapter_dir),
             *(folder_files(base) if base.is_dir() else [])]
    check_output(out, option="--out", folders=folders, files=files, overwrite=overwrite, replaces_folder=hf_folder)
    if tokenizer_dir is None:
        from lema.data.tokenizer import find_tokenizer_dir

        tokenizer_dir = find_tokenizer_dir(adapter_dir, base)
    if not hf_folder:
        from lema.app.tools.convert import check_tokenizer_beside

        check_tokenizer_beside(out, tokenizer_dir, overwrite)
    target = output_dtype(dtype)
    adapter_config, adapter_tensors = read_adapter(adapter_dir)
    deltas = lora_deltas(adapter_config, adapter_tensors)
    config_text, names, loader = _open_base(base)
    config = json.loads(config_text)
    if "quantization_config" in config:  # a 4-bit / 8-bit base merges into its dense model
        names, loader, config = dequantized_base(names, loader, config)
        config_text = json.dumps(config)
    dims = arch.dims_of(config)
    plan = plan_tensors(names, config)
    if hf_folder and dims.tied_embeddings:
        plan = [(n, s) for n, s in plan if n != "lm_head.weight"]
    unmatched = sorted(set(deltas) - {n for n, _ in plan})
    if unmatched:
        raise CheckpointError(f"adapter {adapter_dir} has LoRA weights for {len(unmatched)} modules the base model "
                              f"lacks (e.g. {', '.join(unmatched[:3])}); is it for another model?")
    fan_in_fan_out = bool(adapter_config.get("fan_in_fan_out"))
    conv1d = bool(arch.family(dims.family).conv1d)

    def out_dtype(src: str) -> torch.dtype:
        d = loader.meta[src][0]
        return target if target is not None and d.is_floating_point else d

    entries = [(n, out_dtype(s), loader.meta[s][1]) for n, s in plan]
    # Every tensor consumed by the family's math, every shape as the config implies: else nothing is written.
    ModelSpec.from_header({n: {"dtype": code_of(d), "shape": list(shape)} for n, d, shape in entries}, config)
    for name, _, shape in entries:
        if name in deltas:
            a, b, _ = deltas[name]
            want = (b.shape[0], a.shape[1])
            if conv1d or fan_in_fan_out:
                want = want[::-1]
            if tuple(shape) != want:
                raise CheckpointError(f"adapter {adapter_dir}: LoRA for {name} makes a {list(want)} delta, "
                                      f"the base weight is {list(shape)}; is it for another model?")
    from lema import __version__

    def write(path: Path, metadata: dict[str, str], then: Callable[[], Any] | None = None) -> None:
        with open_safetensors_writer(path, entries, metadata) as writer:
            for done, ((name, src), (_, want, _)) in enumerate(zip(plan, entries), start=1):
                tensor = loader.get(src)
                if not is_finite(tensor):
                    raise ModelFormatError(f"base weight {src} holds NaN or infinite values; the base model is "
                                           "corrupt (nothing was written): re-download or re-convert it")
                if name in deltas:
                    a, b, scaling = deltas[name]
                    delta = b.float() @ a.float()
                    if conv1d or fan_in_fan_out:
                        delta = delta.T
                    tensor = (tensor.float() + scaling * delta).to(want)
                    if not bool(torch.isfinite(tensor).all()):
                        raise CheckpointError(f"merged weight {name} has non-finite values (inf/nan) in {want}; "
                                              "nothing was written: check the adapter, or merge to float32")
                elif tensor.dtype != want:
                    tensor = tensor.to(want)
                writer.write(name, tensor)
                if progress is not None:
                    progress(done, len(plan), name)
            if then is not None:  # before the file is renamed into place: see convert's writing_output
                then()

    if not hf_folder:
        if out.is_dir():
            raise ConfigError(f"{out}: is a folder; pass a .safetensors file name or use --hf-folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        with writing_output(out):
            write(out, {"format": "pt", "config": config_text, "lema_version": __version__},
                  then=lambda: write_tokenizer_beside(tokenizer_dir, out))
        return out
    with writing_output(out), atomic_directory(out) as tmp:
        write(tmp / "model.safetensors", {"format": "pt"})
        (tmp / "config.json").write_text(config_text, encoding="utf-8")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return out
