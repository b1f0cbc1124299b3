"""The byte arithmetic behind the memory plan: one function per device or host item.

Pure integer arithmetic over a :class:`ModelFacts` (the few numbers of a ``ModelSpec`` the
plan needs, computed once) and a training shape. Notation, used in every docstring:
``T = batch * seq`` tokens, ``h`` hidden size, ``q = n_heads * head_dim``,
``kv = n_kv_heads * head_dim``, ``f`` the MLP intermediate size, ``V`` the vocabulary,
``r`` the LoRA rank, ``a`` the bytes of one activation element (the compute dtype).

The activation terms follow Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models", section 4) adapted to what :mod:`lema.domain.blocks`
actually saves for backward: Llama's RMSNorm upcasts to fp32, rotary q/k, grouped-query
attention, the SwiGLU MLP (gate, up, silu(gate), their product), and LoRA adapters held
in fp32 (so each adapted module keeps an fp32 copy of its input and ``A x``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import attrs

from lema.domain.schedule import SLOT_ALIGN
from lema.domain.spec import ModelSpec, itemsize

MiB = 1024**2
FP32 = 4
# transformers' written-out tanh GELU keeps five tensors of the MLP width for backward
# (x, tanh(.), 1 + tanh(.), 0.5 x and the result); fused activations keep two.
_SAVED_BY_ACTIVATION = {"gelu_new": 5, "gelu_fast": 5}


@attrs.frozen
class MemoryItem:
    """One line of a plan: a name, a byte count and a short note (how it was computed).

    Attributes:
        name: e.g. ``"weight_slots"``.
        bytes: integer bytes, never negative.
        note: a human hint (``"3 slots x 386.0 MiB"``).
        parts: the named terms the item sums, when it has any (``layer_working_set``).
    """

    name: str
    bytes: int
    note: str = ""
    parts: tuple["MemoryItem", ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "bytes": self.bytes, "note": self.note}
        if self.parts:
            out["parts"] = [p.to_dict() for p in self.parts]
        return out


def summed(name: str, parts: Sequence[MemoryItem], note: str = "") -> MemoryItem:
    """An item whose bytes are the sum of its (non-zero) parts."""
    kept = tuple(p for p in parts if p.bytes)
    return MemoryItem(name, sum(p.bytes for p in kept), note, kept)


@attrs.frozen
class ModelFacts:
    """What the planner needs to know about a model, at the planned dtype.

    Attributes:
        unit_bytes: bytes of every unit (``units[i]``), at the planned dtype (what crosses the link).
        unit_buffer_bytes: the same with each tensor aligned to ``SLOT_ALIGN`` bytes, as the
            engine lays a unit out in a slot (equal to ``unit_bytes`` for real models).
        embed_only_bytes: bytes of the embedding tensors not shared with the head.
        streamed_bytes: bytes of the unique tensors of units ``1..L+1`` (what RESIDENT holds).
        lora_modules: ``(in, out)`` of each adapted module of one decoder layer.
    """

    family: str
    n_layers: int
    hidden: int
    n_heads: int
    q_dim: int
    kv_dim: int
    ffn: int
    vocab: int
    act_bytes: int
    activation: str
    unit_bytes: tuple[int, ...]
    unit_buffer_bytes: tuple[int, ...]
    embed_only_bytes: int
    streamed_bytes: int
    lora_modules: tuple[tuple[int, int], ...]
    targets: tuple[str, ...]


def model_facts(spec: ModelSpec, dtype: str | None, targets: Sequence[str], lora_modules: Sequence[tuple[int, int]]
                ) -> ModelFacts:
    """Collect a spec's numbers once; ``dtype`` (a code like ``"BF16"``) overrides the file's."""

    def nbytes(t: Any) -> int:
        # Only floating tensors are cast to the planned dtype.
        floating = t.dtype in ("F64", "F32", "F16", "BF16")
        return t.numel * itemsize(dtype) if dtype is not None and floating else t.nbytes

    config: Mapping[str, Any] = spec.config
    streamed = {t.name: nbytes(t) for u in spec.units[1:] for t in u.tensors}
    embed_only = sum(nbytes(t) for t in spec.units[0].tensors if t.name not in streamed)
    act = str(config.get("hidden_act") or config.get("activation_function") or "silu")
    return ModelFacts(
        family=spec.family, n_layers=spec.n_layers, hidden=spec.hidden_size, n_heads=spec.n_heads,
        q_dim=spec.n_heads * spec.head_dim, kv_dim=spec.n_kv_heads * spec.head_dim,
        ffn=spec.intermediate_size, vocab=spec.vocab_size, act_bytes=itemsize(dtype or spec.dtype),
        activation=act, unit_bytes=tuple(sum(nbytes(t) for t in u.tensors) for u in spec.units),
        unit_buffer_bytes=tuple(sum(-(-nbytes(t) // SLOT_ALIGN) * SLOT_ALIGN for t in u.tensors) for u in spec.units),
        embed_only_bytes=embed_only, streamed_bytes=sum(streamed.values()),
        lora_modules=tuple(lora_modules), targets=tuple(targets),
    )


def lora_parameters(facts: ModelFacts, rank: int) -> int:
    """LoRA parameters of the whole model: ``n_layers * sum over modules of r * (in + out)``."""
    return facts.n_layers * rank * sum(i + o for i, o in facts.lora_modules)


def layer_saved_terms(f: ModelFacts, batch: int, seq: int, rank: int, attention: str) -> list[MemoryItem]:
    """The tensors autograd keeps for backward in one decoder layer (forward or recompute).

    Llama (``a != 4``; when ``a == 4`` the fp32 casts are the tensors themselves):

    * ``norms``: per RMSNorm, the fp32 copy of its input and its output: ``2 T h (4 + a)``.
    * ``attention``: rotary q and k, v, and the SDPA output: ``T (2q + 2kv) a``.
    * ``attention_scores`` (math path only): the softmax probabilities ``b H s^2 a``;
      with grouped-query attention the repeated k and v, ``2 T (q - kv) a``.
    * ``mlp``: gate, up, silu(gate) and their product: ``4 T f a``.
    * ``lora``: per adapted module, ``A x`` in fp32 (``T r 4``) and, when ``a != 4``, the
      fp32 copy of the module's input (``T in 4``).

    GPT-2: two LayerNorm outputs and the residual ``3 T h a``, c_attn's output and the
    attention output (kept before and after the head merge) ``T 5h a``, and the MLP
    ``k T f a`` with ``k = 5`` for the written-out tanh GELU, 2 otherwise.
    """
    t, h, a = batch * seq, f.hidden, f.act_bytes
    cast = FP32 if a != FP32 else 0
    items: list[MemoryItem] = []
    if f.family == "gpt2":
        items.append(MemoryItem("norms", 3 * t * h * a, "LayerNorm outputs + residual: 3 T h a"))
        items.append(MemoryItem("attention", 5 * t * h * a, "c_attn output + attention output: 5 T h a"))
        k = _SAVED_BY_ACTIVATION.get(f.activation, 2)
        items.append(MemoryItem("mlp", k * t * f.ffn * a, f"c_fc output + {f.activation}: {k} T f a"))
    else:
        items.append(MemoryItem("norms", 2 * t * h * (FP32 + a), "2 RMSNorms, fp32 input + output: 2 T h (4 + a)"))
        items.append(MemoryItem("attention", t * (2 * f.q_dim + 2 * f.kv_dim) * a,
                                "rotary q, k, v, SDPA output: T (2q + 2kv) a"))
        items.append(MemoryItem("mlp", 4 * t * f.ffn * a, "SwiGLU gate, up, silu, product: 4 T f a"))
    if attention == "math":
        items.append(MemoryItem("attention_scores", batch * f.n_heads * seq * seq * a,
                                "math attention: softmax probabilities b H s^2 a"))
        if f.kv_dim < f.q_dim:
            items.append(MemoryItem("kv_repeat", 2 * t * (f.q_dim - f.kv_dim) * a,
                                    "grouped-query k, v repeated to every head: 2 T (q - kv) a"))
    lora = sum(t * rank * FP32 + t * i * cast for i, _ in f.lora_modules)
    items.append(MemoryItem("lora", lora, f"{len(f.lora_modules)} adapters: T r 4 each"
                            + (" + fp32 copy of the input T in 4" if cast else "")))
    return items


def backward_terms(f: ModelFacts, batch: int, seq: int, attention: str) -> list[MemoryItem]:
    """Gradients alive at once while one layer backpropagates.

    * ``grad_buffers``: two gradients of the widest intermediate (``2 T max(f, q + 2kv) a``)
      plus the fp32 gradient of one adapter's output (``T max(f, h) 4``).
    * ``attention_score_grads`` (math path): gradients of the probabilities and the
      scores, ``2 b H s^2 a``.
    """
    t, a = batch * seq, f.act_bytes
    wide = max(f.ffn, f.q_dim + 2 * f.kv_dim)
    items = [MemoryItem("grad_buffers", 2 * t * wide * a + t * max(f.ffn, f.hidden) * FP32,
                        "2 T max(f, q + 2kv) a + T max(f, h) 4")]
    if attention == "math":
        items.append(MemoryItem("attention_score_grads", 2 * batch * f.n_heads * seq * seq * a,
                                "gradients of scores and probabilities: 2 b H s^2 a"))
    return items


def forward_terms(f: ModelFacts, batch: int, seq: int, attention: str) -> list[MemoryItem]:
    """The peak of one layer's forward without autograd (inference): the larger of the
    attention half (``T (2q + 2kv) a`` plus ``2 b H s^2 a`` on the math path) and the MLP half
    (``3 T f a``), plus one fp32 temporary of an adapter or norm (``T max(f, h) 4``)."""
    t, a = batch * seq, f.act_bytes
    attn = t * (2 * f.q_dim + 2 * f.kv_dim) * a
    if attention == "math":
        attn += 2 * batch * f.n_heads * seq * seq * a
    mlp = 3 * t * f.ffn * a
    return [MemoryItem("attention" if attn >= mlp else "mlp", max(attn, mlp), "the larger half of the layer"),
            MemoryItem("fp32_temporary", t * max(f.ffn, f.hidden) * FP32, "T max(f, h) 4")]


def head_chunk(f: ModelFacts, batch: int, seq: int, chunk_tokens: int, train: bool) -> MemoryItem:
    """Final norm, logits and (training) their gradient for one chunk of tokens.

    ``c = min(T, chunk_tokens)``. Training: the norm's fp32 input copy, output and the
    gradient towards the hidden states for all tokens, ``T h (4 + 2a)``, plus one chunk's
    logits (compute dtype and fp32), probabilities and their cast gradient
    ``c V (4 + 4 + 2a)``. Inference: ``T h (4 + a) + c V (4 + a)``.
    """
    t, a = batch * seq, f.act_bytes
    c = min(t, chunk_tokens)
    if train:
        return summed("head_chunk", [MemoryItem("final_norm", t * f.hidden * (FP32 + 2 * a), "T h (4 + 2a)"),
                                     MemoryItem("logits", c * f.vocab * (2 * FP32 + 2 * a), "c V (8 + 2a)")],
                      f"{c} tokens per chunk")
    return summed("head_chunk", [MemoryItem("final_norm", t * f.hidden * (FP32 + a), "T h (4 + a)"),
                                 MemoryItem("logits", c * f.vocab * (FP32 + a), "c V (4 + a)")],
                  f"{c} tokens per chunk")
