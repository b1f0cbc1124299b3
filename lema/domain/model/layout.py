"""What every family describes: a model's dimensions and the tensors it must have (pure).

Each tensor of a model belongs to one *unit*: unit 0 is the embedding, units 1..L are the
decoder layers and unit L+1 is the head (final norm + output projection). Inside a unit a
tensor has a *key*, its name with the unit's prefix removed (``self_attn.q_proj.weight``),
which is what the functional blocks read.
"""

from __future__ import annotations

import re

import attrs

EMBED, DECODER, HEAD = "embed", "decoder", "head"


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
    """The dimensions of a model, read from its Hugging Face ``config.json``."""

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


# Buffers some checkpoints carry that are not weights (GPT-2's causal mask, rotary caches).
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def is_ignored(name: str) -> bool:
    """True for non-weight buffers found in some checkpoints."""
    return bool(_IGNORED.search(name))
