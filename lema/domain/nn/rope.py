"""Rotary position embeddings, computed the way transformers 5 does (pure torch).

The context turns a :class:`~lema.domain.nn.rope_config.RopeSpec` and a batch's
positions into cos/sin tables (:func:`rope_tables`); the blocks rotate q and k
(:func:`apply_rope`). The inverse frequencies of every rope type (:func:`inv_freq`) mirror
``transformers.modeling_rope_utils`` step by step: fp32 frequencies, the same casts, the
batch-wide length for dynamic NTK and longrope.

Example:
    >>> from lema.domain.nn.rope_config import standard_rope
    >>> cfg = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 32}
    >>> cos, sin = rope_tables(standard_rope(cfg, head_dim=16), torch.arange(5)[None], torch.float32)
    >>> cos.shape
    torch.Size([1, 5, 16])
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from lema.domain.nn.rope_config import RopeSpec
from lema.errors import ModelFormatError


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _arange(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


@functools.lru_cache(maxsize=64)
def inv_freq(spec: RopeSpec, seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """``(inverse frequencies [dim / 2] fp32, cos/sin scale)`` for sequences of ``seq_len``.

    ``seq_len`` (the batch's largest position + 1) matters only for ``dynamic`` (recomputed
    base beyond ``max_positions``) and ``longrope`` (long factors beyond the original
    length); pass 0 otherwise. Cached; treat the tensor as read-only.
    """
    t, base, dim, p = spec.rope_type, spec.theta, spec.dim, dict(spec.params)
    if t == "default":
        return 1.0 / (base ** _arange(dim)), 1.0
    if t == "linear":
        return (1.0 / (base ** _arange(dim))) / p["factor"], 1.0
    if t == "dynamic":
        factor, max_pos = p["factor"], spec.max_positions
        # Past max_positions transformers recomputes with the length as a tensor; below, with ints.
        length: Any = torch.tensor(seq_len, dtype=torch.int64) if seq_len > max_pos else max_pos
        scaled = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (scaled ** _arange(dim)), 1.0
    if t == "yarn":
        return _yarn(p, base, dim, spec.max_positions)
    if t == "longrope":
        original = p["original_max_position_embeddings"]
        factor = p.get("factor") or spec.max_positions / original
        scale = p.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = torch.tensor(p["long_factor"] if seq_len > original else p["short_factor"], dtype=torch.float32)
        return 1.0 / (ext * base ** _arange(dim)), float(scale)
    if t == "llama3":
        inv = 1.0 / (base ** _arange(dim))
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ModelFormatError(f"rope_type {t!r} is not implemented")


def _yarn(p: dict[str, Any], base: float, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original
    scale = p.get("attention_factor")
    ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
    if scale is None:
        scale = _yarn_mscale(factor, ms) / _yarn_mscale(factor, ms_all) if (ms and ms_all) else _yarn_mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction(fast), correction(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(scale)


def rope_tables(spec: RopeSpec, position_ids: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each ``(batch, seq, dim)``, for ``position_ids`` ``(batch, seq)``.

    Computed in fp32 and cast to ``dtype`` (None keeps fp32, as OLMo 2 does). For the
    length-dependent types the batch's largest position decides, as in transformers.
    """
    seq_len = int(position_ids.max()) + 1 if spec.length_dependent and position_ids.numel() else 0
    inv, scale = inv_freq(spec, seq_len)
    freqs = position_ids[..., None].float() * inv.to(device=position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * scale, emb.sin() * scale
    if dtype is not None:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return ((x * cos) + (_rotate_half(x) * sin)).to(x.dtype)
    xr, xp = x[..., :r], x[..., r:]
    return torch.cat(((xr * cos) + (_rotate_half(xr) * sin), xp.to(torch.promote_types(xp.dtype, cos.dtype))),
                     dim=-1).to(x.dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` (``(batch, heads, seq, head_dim)``) by ``(batch, seq, dim)`` tables.

    With ``dim < head_dim`` (partial rotary) only the first ``dim`` dimensions rotate. The
    results keep ``q``'s and ``k``'s dtypes (fp32 tables rotate in fp32, then cast back).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
