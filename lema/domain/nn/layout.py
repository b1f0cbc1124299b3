"""What every family describes: a model's dimensions and the tensors it must have (pure).

Each tensor of a model belongs to one *unit*: unit 0 is the embedding, units 1..L are the
decoder layers and unit L+1 is the head (final norm + output projection). Inside a unit a
tensor has a *key*, its name with the unit's prefix removed (``self_attn.q_proj.weight``),
which is what the functional blocks read.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Mapping, Protocol

import attrs

from lema.domain.nn.rope_config import RopeSpec
from lema.errors import ModelFormatError

EMBED, DECODER, HEAD = "embed", "decoder", "head"
FULL, SLIDING = "full_attention", "sliding_attention"


@attrs.frozen
class ExpectedTensor:
    """One tensor a model of this config must have.

    Attributes:
        unit: unit index (0 embed, 1..L decoders, L+1 head).
        key: name inside the unit, as the blocks read it.
        names: file names it may be stored under, preferred first (tied weights have two).
        shape: the shape the config implies.
        optional: True for tensors some checkpoints omit (e.g. a tied ``lm_head.weight``).
    """

    unit: int
    key: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    optional: bool = False


@attrs.frozen
class Dims:
    """The dimensions of a model, read from its Hugging Face ``config.json``.

    ``n_experts``, ``experts_per_token`` and ``expert_intermediate_size`` are 0 for dense
    models; for mixture-of-experts models ``intermediate_size`` is the dense MLP's (or the
    expert's when every layer is routed).
    """

    family: str
    model_type: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    attention_bias: bool
    max_positions: int
    activation: str = "silu"
    n_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0


class ModelShape(Protocol):
    """What a family reads of a model to give its plan terms (``ModelSpec`` has these)."""

    @property
    def hidden_size(self) -> int: ...

    @property
    def n_heads(self) -> int: ...

    @property
    def n_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def config_json(self) -> str: ...


class LayerFormulas(enum.Enum):
    """Which measured working-set formulas of :mod:`lema.domain.plan` a layer follows."""

    #: RMSNorm pre-norms, rotary q/k, separate q/k/v projections, a gated MLP (Llama and kin).
    ROTARY_GATED = "rotary_gated"
    #: LayerNorm, learned positions (no rope tables), one fused c_attn, a GELU MLP (GPT-2).
    LEARNED_FUSED = "learned_fused"


@attrs.frozen
class PlanTerms:
    """What a family's layer keeps for backward beyond a Llama layer's, for the memory plan.

    Attributes:
        formulas: the working-set formulas its layer follows (:class:`LayerFormulas`).
        qk_norm_width: summed widths of the norms on q and k, per token (Qwen3, Gemma 3, OLMo 2).
        post_norm_width: summed widths of the norms on the sub-layers' outputs besides a
            Llama layer's two pre-norms, per token (Gemma's two post-norms).
        eager_scores: attention runs eagerly (soft-capping) and keeps ``s^2`` scores.
        fused_qkv: q, k and v are views of one fused projection, alive together (Phi-3).
        router_fp32: the experts' routing weights stay fp32 (Mixtral).
    """

    formulas: LayerFormulas = LayerFormulas.ROTARY_GATED
    qk_norm_width: int = 0
    post_norm_width: int = 0
    eager_scores: bool = False
    fused_qkv: bool = False
    router_fp32: bool = False


@attrs.frozen
class AttentionLayout:
    """How a model's layers attend: what :mod:`lema.domain.model.context` builds per batch.

    Attributes:
        layer_types: per decoder layer, ``"full_attention"`` or ``"sliding_attention"``.
        sliding_window: the window of sliding layers (the W most recent keys, the query
            included), or None.
        ropes: attention kind -> its rotary embedding; empty for learned positions (GPT-2).
        rope_fp32: keep the cos/sin tables in fp32 and rotate in fp32 (OLMo 2).
    """

    layer_types: tuple[str, ...]
    sliding_window: int | None = None
    ropes: tuple[tuple[str, RopeSpec], ...] = ()
    rope_fp32: bool = False

    def rope(self, kind: str) -> RopeSpec | None:
        """The rope of an attention kind (None: no rotary embedding)."""
        return dict(self.ropes).get(kind)


def config_int(config: Mapping[str, Any], *names: str, default: int | None = None) -> int:
    for name in names:
        value = config.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"config.json: {name}={value!r} must be a positive integer")
            return value
    if default is not None:
        return default
    raise ModelFormatError(f"config.json: missing {' or '.join(names)}; is this a causal LM config?")


# Buffers some checkpoints carry that are not weights (GPT-2's causal mask, rotary caches).
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def is_ignored(name: str) -> bool:
    """True for non-weight buffers found in some checkpoints."""
    return bool(_IGNORED.search(name))


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
# Modules that read one input and stack their adapters' A products
# (lema.domain.nn.linear.Projector.many, called by lema.domain.nn.decoder_block); the plan
# counts one fp32 copy of the input per group (lema.domain.plan.items).
SHARED_INPUTS = (QKV, GATE_UP)
