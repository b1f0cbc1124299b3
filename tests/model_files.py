"""Write transformers models as LEMA model files (monolithic safetensors, config inside)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def save_monolithic(model: Any, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Save a transformers model's weights as one safetensors file with its config in metadata.

    Tied weights are cloned so both names are present (what ``lema convert`` writes).
    """
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone().contiguous()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    config = model.config.to_dict()
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    save_file(state, str(path), metadata={"config": json.dumps(config), "format": "pt"})
    return path


def write_model_folder(model: Any, folder: Path) -> Path:
    """``save_pretrained`` into ``folder`` (config.json + model.safetensors)."""
    model.save_pretrained(str(folder))
    return folder
