"""Rotary embedding settings read from a ``config.json``, as transformers 5 normalises them (pure, no torch).

A family turns its config into one :class:`RopeSpec` per attention kind (Gemma 3 has a
local and a global one) with :func:`standard_rope` or :func:`gemma3_ropes`;
:mod:`lema.domain.nn.rope` computes the tables. Every rope type transformers ships for
the supported families is accepted: ``default``, ``linear``, ``dynamic`` (NTK), ``yarn``,
``longrope`` and ``llama3``, including the legacy ``rope_scaling`` / ``rope_theta`` /
``type`` keys; anything else is refused by name. Torch-free, so ``lema plan`` validates a
config without importing torch.

Example:
    >>> cfg = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 32,
    ...        "rope_scaling": {"type": "linear", "factor": 2.0}}
    >>> spec = standard_rope(cfg, head_dim=16)
    >>> spec.rope_type, spec.theta, spec.get("factor")
    ('linear', 10000.0, 2.0)
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from lema.errors import ModelFormatError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_SCALED = ("llama3", "yarn", "longrope")
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
             "longrope": ("short_factor", "long_factor"), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


@attrs.frozen
class RopeSpec:
    """One attention kind's rotary embedding.

    Attributes:
        rope_type: one of :data:`ROPE_TYPES`.
        theta: the base.
        dim: rotated dimensions per head (``head_dim``, less with partial rotary).
        max_positions: ``max_position_embeddings`` (dynamic NTK's and longrope's threshold).
        params: the normalised rope dict as sorted ``(key, value)`` pairs (lists as tuples).
    """

    rope_type: str
    theta: float
    dim: int
    max_positions: int
    params: tuple[tuple[str, Any], ...]

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    @property
    def length_dependent(self) -> bool:
        """True when the frequencies depend on the batch's longest position (dynamic, longrope)."""
        return self.rope_type in ("dynamic", "longrope")


def rope_dict(config: Mapping[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """The rope parameters of a config as transformers normalises them (legacy keys included).

    ``rope_scaling`` wins over ``rope_parameters``; ``type`` means ``rope_type``; a top-level
    ``rope_theta`` / ``partial_rotary_factor`` fills the dict; for llama3, yarn and longrope a
    top-level ``original_max_position_embeddings`` wins over the dict's, which defaults to
    ``max_position_embeddings``.
    """
    rp = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rp.setdefault("rope_type", rp.get("type", "default"))
    rp.setdefault("rope_theta", config.get("rope_theta", default_theta))
    if config.get("partial_rotary_factor") is not None:
        rp.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if rp["rope_type"] in _SCALED:
        if config.get("original_max_position_embeddings") is not None:
            rp["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        else:
            rp.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return rp


def make_rope(rp: Mapping[str, Any], config: Mapping[str, Any], head_dim: int, *, partial: bool = False,
              where: str = "rope_parameters") -> RopeSpec:
    """A validated :class:`RopeSpec` from a normalised rope dict.

    Args:
        rp: from :func:`rope_dict` (or one entry of :func:`gemma3_ropes`).
        config: the config dict (``max_position_embeddings``).
        head_dim: the attention head size.
        partial: the family rotates only ``head_dim * partial_rotary_factor`` dimensions
            (Phi-3); otherwise a factor other than 1 is refused.
        where: the config key named in errors.

    Raises:
        ModelFormatError: an unknown rope type, a missing parameter, or partial rotary in a
            family that does not implement it.
    """
    rope_type = str(rp.get("rope_type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelFormatError(f"config.json: {where}.rope_type={rope_type!r} is not implemented; LEMA implements "
                               f"{', '.join(ROPE_TYPES)}")
    if rp.get("mrope_section") is not None:
        raise ModelFormatError(f"config.json: {where}.mrope_section={rp['mrope_section']!r} (multimodal rope) is "
                               "not implemented")
    missing = [k for k in _REQUIRED.get(rope_type, ()) if rp.get(k) is None]
    if missing:
        raise ModelFormatError(f"config.json: {where} of rope_type {rope_type!r} lacks {', '.join(missing)}")
    prf = float(rp.get("partial_rotary_factor", 1.0) or 1.0)
    if prf != 1.0 and not partial:
        raise ModelFormatError(f"config.json: partial_rotary_factor={prf!r} is not implemented for this family "
                               "(it rotates every head dimension); use a config without it")
    max_positions = int(config.get("max_position_embeddings") or 2048)
    # transformers' default rope ignores partial rotary except where the family honours it (Phi-3).
    dim = int(head_dim * prf)
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(rp[key]) != dim // 2:
                raise ModelFormatError(f"config.json: {where}.{key} has {len(rp[key])} values, the rotary "
                                       f"dimension {dim} needs {dim // 2}")
    params = tuple(sorted((str(k), _frozen(v)) for k, v in rp.items()))
    return RopeSpec(rope_type=rope_type, theta=float(rp["rope_theta"]), dim=dim, max_positions=max_positions,
                    params=params)


def standard_rope(config: Mapping[str, Any], head_dim: int, *, default_theta: float = 10000.0,
                  partial: bool = False) -> RopeSpec:
    """The single rope of a Llama-style config (see :func:`rope_dict` and :func:`make_rope`).

    Raises:
        ModelFormatError: also for rope parameters nested per layer type (Gemma 3's form)
            in a family with one rope.
    """
    nested = sorted(k for k in (config.get("rope_parameters") or {}) if k in ("full_attention", "sliding_attention"))
    if nested:
        raise ModelFormatError(f"config.json: rope_parameters nested per layer type ({', '.join(nested)}) is not "
                               "implemented for this family")
    return make_rope(rope_dict(config, default_theta), config, head_dim, partial=partial)


def gemma3_ropes(config: Mapping[str, Any], head_dim: int) -> dict[str, RopeSpec]:
    """Gemma 3's per-attention-kind ropes: ``{"sliding_attention": ..., "full_attention": ...}``.

    As ``Gemma3TextConfig``: only keys named after layer types count in ``rope_parameters``
    (a flat dict there is ignored, as transformers ignores it); legacy ``rope_theta`` is the
    global base (default 1e6), ``rope_local_base_freq`` the local one (1e4), and
    ``rope_scaling`` applies to the full-attention layers only.
    """
    given = config.get("rope_parameters") or {}
    rp = {k: dict(v) if v is not None else None for k, v in given.items() if k in ("sliding_attention",
                                                                                   "full_attention")}
    if config.get("rope_scaling") is not None:
        rp["full_attention"] = {**(rp.get("full_attention") or {"rope_type": "default"}), **config["rope_scaling"]}
    full = rp.get("full_attention") or {"rope_type": "default"}
    full.setdefault("rope_theta", config.get("rope_theta", 1_000_000.0))
    local = rp.get("sliding_attention") or {"rope_type": "default"}
    local.setdefault("rope_theta", config.get("rope_local_base_freq", 10_000.0))
    out = {}
    for kind, d in (("sliding_attention", local), ("full_attention", full)):
        d.setdefault("rope_type", d.get("type", "default"))
        if d["rope_type"] in _SCALED:
            d.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
        out[kind] = make_rope(d, config, head_dim, where=f"rope_parameters.{kind}")
    return out
