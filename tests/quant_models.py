"""Tiny models quantized by transformers + bitsandbytes (the reference LEMA must read as published).

``quantized_folder(kind, variant, root)`` writes ``root/dense`` (the 16/32-bit model,
``save_pretrained``) and ``root/<variant>`` (the same model loaded with a
``BitsAndBytesConfig`` and saved before any forward: bitsandbytes repacks 4-bit weights in
place on an eval forward on CPUs with AVX512-BF16). ``hf_quantized(folder)`` loads such a
folder in ``train()`` mode: bitsandbytes' eval path on those CPUs computes in bf16, its
train path dequantizes and multiplies in the compute dtype, like LEMA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import build_hf_model

VARIANTS: dict[str, dict[str, Any]] = {
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "fp4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def bnb_config(variant: str, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import BitsAndBytesConfig

    kw = dict(VARIANTS[variant])
    if kw.get("load_in_4bit"):
        kw["bnb_4bit_compute_dtype"] = dtype
    return BitsAndBytesConfig(**kw)


def dense_folder(kind: str, root: Path, seed: int = 0, dtype: torch.dtype | None = None, model: Any = None) -> Path:
    """``root/dense``: a tiny random transformers model (``build_hf_model(kind, seed)`` or ``model``)."""
    folder = root / "dense"
    if not (folder / "config.json").is_file():
        hf = model if model is not None else build_hf_model(kind, seed=seed)
        if dtype is not None:
            hf = hf.to(dtype)
        hf.save_pretrained(folder)
    return folder


def quantized_folder(kind: str, variant: str, root: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                     model: Any = None) -> Path:
    """``root/<variant>``: ``root/dense`` quantized by transformers + bitsandbytes, as published."""
    from transformers import AutoModelForCausalLM

    dense = dense_folder(kind, root, seed, dtype if dtype != torch.float32 else None, model)
    out = root / variant
    if not (out / "config.json").is_file():
        hf = AutoModelForCausalLM.from_pretrained(dense, quantization_config=bnb_config(variant, dtype), dtype=dtype,
                                                  device_map="cpu")
        hf.save_pretrained(out)  # before any forward (see the module docstring)
    return out


def hf_quantized(folder: Path, attn_implementation: str = "sdpa") -> Any:
    """The transformers model of a quantized folder, in ``train()`` mode (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", attn_implementation=attn_implementation)
    return model.train()
