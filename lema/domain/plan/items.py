"""The byte arithmetic behind the memory plan: one function per device or host item.

Pure integer arithmetic over a :class:`ModelFacts` (the few numbers of a ``ModelSpec`` the
plan needs, computed once) and a training shape. Notation, used in every docstring:
``T = batch * seq`` tokens, ``h`` hidden size, ``q = n_heads * head_dim``,
``kv = n_kv_heads * head_dim``, ``f`` the MLP intermediate size, ``V`` the vocabulary,
``r`` the LoRA rank, ``a`` the bytes of one activation element (the compute dtype).

The activation terms follow Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models", section 4) adapted to what :mod:`lema.domain.model.blocks`
actually saves for backward: Llama's RMSNorm upcasts to fp32, rotary q/k, grouped-query
attention, the SwiGLU MLP (gate, up, silu(gate), their product), and LoRA adapters held
in fp32 (so each adapted module keeps an fp32 copy of its input and ``A x``).
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs

from lema.domain.families import registry
from lema.domain.nn import quant
from lema.domain.nn.layout import SHARED_INPUTS, LayerFormulas
from lema.domain.model.spec import ModelSpec, itemsize
from lema.domain.plan import family_terms
from lema.domain.schedule.slot_layout import SLOT_ALIGN

LEARNED_FUSED = LayerFormulas.LEARNED_FUSED

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
        parts: the named terms the item is made of, when it has any.
        combine: ``"sum"`` (bytes = the parts' sum) or ``"max"`` (bytes = the largest part:
            ``activation_peak``, whose parts are phases of the step that never coexist).
    """

    name: str
    bytes: int
    note: str = ""
    parts: tuple["MemoryItem", ...] = ()
    combine: str = "sum"  # how bytes follow from parts: "sum", or "max" (phases that never coexist)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "bytes": self.bytes, "note": self.note}
        if self.parts:
            out["parts"] = [p.to_dict() for p in self.parts]
            out["combine"] = self.combine
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
        dequant_bytes: per unit, its packed weights dequantized to the planned dtype (the
            scratch buffer's layout, :func:`lema.domain.nn.quant.dense_bytes`); 0 for dense units.
        castable_bytes: per unit, the bytes of its dense tensors (what a dtype cast copies).
        dequant_temp: the transient bytes of dequantizing the largest packed weight, on a CPU
            and on CUDA (:func:`dequant_temporaries`).
        quantization: the packed weights' format (``"NF4 + double quant"``), or "".
    """

    family: str
    formulas: LayerFormulas
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
    lora_keys: tuple[str, ...] = ()  # in-layer keys of the adapted modules (``lora_modules`` order)
    head_dim: int = 0
    # beyond a Llama layer (see lema.domain.plan.family_terms): routed experts, norms, scores
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    dense_ffn: int = 0
    router_fp32: bool = False
    qk_norm_width: int = 0
    post_norm_width: int = 0
    eager_scores: bool = False
    fused_qkv: bool = False
    dequant_bytes: tuple[int, ...] = ()
    castable_bytes: tuple[int, ...] = ()
    dequant_temp: tuple[int, int] = (0, 0)  # (cpu, cuda)
    quantization: str = ""


def model_facts(spec: ModelSpec, dtype: str | None, targets: Sequence[str], lora_modules: Sequence[tuple[int, int]],
                keys: Sequence[str] = ()) -> ModelFacts:
    """Collect a spec's numbers once; ``dtype`` (a code like ``"BF16"``) overrides the file's."""

    # Tensors holding packed weights stream as they are stored, whatever the planned dtype.
    stored = {t.name for u in spec.units for t in u.tensors if t.key in u.stored_keys}

    def nbytes(t: Any) -> int:
        # Only floating tensors are cast to the planned dtype.
        floating = t.dtype in ("F64", "F32", "F16", "BF16") and t.name not in stored
        return t.numel * itemsize(dtype) if dtype is not None and floating else t.nbytes

    streamed = {t.name: nbytes(t) for u in spec.units[1:] for t in u.tensors}
    embed_only = sum(nbytes(t) for t in spec.units[0].tensors if t.name not in streamed)
    terms = registry.plan_terms(spec)
    dense = spec.intermediate_size if spec.intermediate_size != spec.expert_intermediate_size else 0
    act_bytes = itemsize(dtype or spec.dtype)
    return ModelFacts(
        family=spec.family, formulas=terms.formulas, n_layers=spec.n_layers, hidden=spec.hidden_size,
        n_heads=spec.n_heads,
        q_dim=spec.n_heads * spec.head_dim, kv_dim=spec.n_kv_heads * spec.head_dim,
        ffn=spec.intermediate_size, vocab=spec.vocab_size, act_bytes=itemsize(dtype or spec.dtype),
        activation=spec.activation, unit_bytes=tuple(sum(nbytes(t) for t in u.tensors) for u in spec.units),
        unit_buffer_bytes=tuple(sum(-(-nbytes(t) // SLOT_ALIGN) * SLOT_ALIGN for t in u.tensors) for u in spec.units),
        embed_only_bytes=embed_only, streamed_bytes=sum(streamed.values()),
        lora_modules=tuple(lora_modules), targets=tuple(targets), lora_keys=tuple(keys), head_dim=spec.head_dim,
        experts=spec.n_experts, top_k=spec.experts_per_token, expert_ffn=spec.expert_intermediate_size,
        dense_ffn=dense if spec.n_experts else 0, router_fp32=terms.router_fp32,
        qk_norm_width=terms.qk_norm_width, post_norm_width=terms.post_norm_width, eager_scores=terms.eager_scores,
        fused_qkv=terms.fused_qkv,
        dequant_bytes=tuple(quant.dense_bytes(u.packed, act_bytes) for u in spec.units),
        castable_bytes=tuple(sum(nbytes(t) for t in u.tensors if t.name not in stored) for u in spec.units),
        dequant_temp=dequant_temporaries(spec, act_bytes),
        quantization=spec.quantization.label if spec.quantization is not None else "",
    )


def dequant_temporaries(spec: ModelSpec, act_bytes: int) -> tuple[int, int]:
    """``(cpu, cuda)`` bytes alive while the largest packed weight is dequantized, on top of
    the scratch buffer (:func:`lema.adapters.weights.bnb.dequantize`).

    4-bit: double quant's fp32 block scales ``4 b`` (``b = ceil(n / 64)``); on a CPU also the
    dense weight ``n a``, which bitsandbytes returns as a new tensor copied into the scratch
    (CUDA writes the scratch in place). A 4-bit weight computed in another dtype than it was
    quantized from (the file's, ``spec.dtype``) also gets a backward weight, made in the
    backward: ``n s`` in the stored dtype and ``n a`` cast (:func:`lema.domain.nn.matmul.split_linear`).
    int8: the row scales ``4 out``.
    """
    cpu = cuda = 0
    stored_bytes = itemsize(spec.dtype)  # the dense tensors' dtype: the one 4-bit weights were quantized from
    for u in spec.units:
        for p in u.packed:
            if p.format.bits == 8:
                scales = p.shape[0] * FP32
                cpu, cuda = max(cpu, scales), max(cuda, scales)
                continue
            absmax = p.blocks * FP32 if p.format.double_quant else 0
            cpu, cuda = max(cpu, p.numel * act_bytes + absmax), max(cuda, absmax)
            if stored_bytes != act_bytes:  # the backward's weight: dequantized into the stored dtype, then cast
                twice = p.numel * (stored_bytes + act_bytes) + absmax
                cpu, cuda = max(cpu, twice), max(cuda, twice)
    return cpu, cuda


def lora_parameters(facts: ModelFacts, rank: int) -> int:
    """LoRA parameters of the whole model: ``n_layers * sum over modules of r * (in + out)``."""
    return facts.n_layers * rank * sum(i + o for i, o in facts.lora_modules)


def _adapter_input_copies(t: int, ad: dict[str, tuple[int, int]]) -> int:
    """The adapters' fp32 input copies: one per module or per fully adapted SHARED_INPUTS group."""
    shared = [g for g in SHARED_INPUTS if all(k in ad for k in g)]
    return t * FP32 * (sum(ad[k][0] for k in ad if not any(k in g for g in shared)) + sum(ad[g[0]][0] for g in shared))


def _adapters(f: ModelFacts) -> dict[str, tuple[int, int]]:
    """``in-layer key -> (in, out)`` of the adapted modules of one decoder layer."""
    return dict(zip(f.lora_keys, f.lora_modules))


@attrs.frozen
class LayerModel:
    """One decoder layer under autograd: what it saves and its two temporary peaks.

    ``saved``: the tensors autograd keeps from the forward for the backward (named parts).
    ``forward_extra``: bytes alive on top of ``saved`` at the forward's peak (the last
    adapted projection: Python locals of the block, the base output and the fp32 LoRA
    delta); ``backward_extra``: on top of ``saved`` at the backward's peak (the layer
    output, the incoming gradient and the first gradients of the MLP).
    """

    saved: tuple[MemoryItem, ...]
    forward_extra: int
    backward_extra: int


def layer_model(f: ModelFacts, batch: int, seq: int, rank: int, attention: str) -> LayerModel:
    """What one decoder layer's recompute + backward allocates (see :class:`LayerModel`).

    Measured op by op with :class:`lema.adapters.devices.allocation_counter.AllocationCounter` against
    :mod:`lema.domain.model.blocks`. A frozen linear map saves nothing (its weight needs no
    gradient); an adapter saves its fp32 input (the tensor itself when ``a == 4``, else a
    copy per module, one per group of modules that read the same input: q, k and v; gate
    and up; :meth:`lema.domain.nn.linear.Projector.many`) and ``A x`` (``T r 4``). Llama:

    * ``norms``: the RMSNorms' fp32 inputs ``2 T h 4`` (``a != 4``) or, at fp32, the
      attention residual ``T h a`` (the layer input is the checkpoint itself); ``2 T 4`` rsqrt.
    * ``attention``: rotary q and k, v, the SDPA output ``T (2q + 2kv) a`` and its fp32
      log-sum-exp ``T H 4`` (the fused kernels); ``attention_scores`` on the math path.
    * ``mlp``: gate, silu(gate), up ``3 T f a`` (their product only as an adapter input).
    * ``lora``: adapter inputs and ``A x``.
    * forward extra: the incoming gradient ``T h a`` (alive through the recompute), and at
      the down projection the base output ``T h a`` plus ``2 T h 4`` (the fp32 delta and the
      sum, which :mod:`lema.domain.nn.lora_update` now writes in ``a``: counted as before)
      and the block's locals not saved (at ``a != 4``: residual, norm output, product
      ``T (2h + f) a``).
    * backward extra: layer output and incoming gradient ``2 T h a`` plus the SwiGLU
      gradients ``3 T f a``, less the down projection's adapter input (released by then).

    GPT-2: LayerNorm statistics ``4 T 4`` and the second input ``T h a``; c_attn's output
    ``3 T h a``, the SDPA output and log-sum-exp; the MLP ``k T f a`` with ``k = 4`` for the
    written-out tanh GELU (input, ``0.5 x``, tanh, ``1 + tanh``), 1 otherwise.
    """
    t, h, a, ff = batch * seq, f.hidden, f.act_bytes, f.ffn
    cast = a != FP32
    ad = _adapters(f)
    lora_in = _adapter_input_copies(t, ad) if cast else 0
    ax = t * rank * FP32 * len(ad)
    lse = t * f.n_heads * FP32
    items: list[MemoryItem] = []
    if f.formulas is LEARNED_FUSED:
        if not cast:
            lora_in = t * h * a * (("attn.c_attn" in ad) + ("mlp.c_fc" in ad)) + t * ff * a * ("mlp.c_proj" in ad)
        items.append(MemoryItem("norms", t * h * a + 4 * t * FP32, "LayerNorm statistics + second input: T h a + 4 T 4"))
        items.append(MemoryItem("attention", 4 * t * h * a + lse, "c_attn output + SDPA output: 4 T h a + T H 4"))
        gelu_new = f.activation in ("gelu_new", "gelu_fast")
        k = 4 if gelu_new else 1
        items.append(MemoryItem("mlp", k * t * ff * a, f"c_fc output + {f.activation}: {k} T f a"))
        keep_norm = not cast and "mlp.c_fc" in ad
        keep_act = not cast and "mlp.c_proj" in ad
        held = (0 if keep_norm else t * h * a) + (0 if keep_act else t * ff * a)
        proj = t * h * a + (2 * t * h * FP32 if "mlp.c_proj" in ad else 0)
        forward_extra = t * h * a + max(held + proj, (0 if keep_norm else t * h * a) + 2 * t * ff * a)
        last = ("mlp.c_proj" in ad) * t * ff * (FP32 if cast else a)
        backward_extra = 2 * t * h * a + (3 if gelu_new else 2) * t * ff * a - last
    else:
        if not cast:
            qkv = any(k in ad for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
            gate_up = any(k in ad for k in ("mlp.gate_proj", "mlp.up_proj"))
            lora_in = t * h * a * (qkv + gate_up) + t * ff * a * ("mlp.down_proj" in ad)
        items.append(MemoryItem("norms", (2 * t * h * FP32 if cast else t * h * a) + 2 * t * FP32,
                                "RMSNorm fp32 inputs: 2 T h 4" if cast else "attention residual: T h a"))
        items.append(MemoryItem("attention", t * (2 * f.q_dim + 2 * f.kv_dim) * a + lse,
                                "rotary q, k, v, SDPA output: T (2q + 2kv) a + T H 4"))
        items += [MemoryItem(*term) for term in (family_terms.mlp_saved(f, t), *family_terms.saved(f, batch, seq))]
        down = "mlp.down_proj" in ad
        if cast:
            held = t * (2 * h + ff) * a
        else:
            gate_up = any(k in ad for k in ("mlp.gate_proj", "mlp.up_proj"))
            held = (0 if gate_up else t * h * a) + (0 if down else t * ff * a)
        forward_extra = held + 2 * t * h * a + (2 * t * h * FP32 if down else 0)
        forward_extra = max(forward_extra, family_terms.recompute_extra(f, t, "mlp.gate_up_proj" in ad))
        backward_extra = (2 * t * h * a + 3 * t * ff * a - down * t * ff * (FP32 if cast else a)
                          + family_terms.backward_extra(f, t))
    if attention == "math":
        items.append(MemoryItem("attention_scores", batch * f.n_heads * seq * seq * a,
                                "math attention: softmax probabilities b H s^2 a"))
        if f.kv_dim < f.q_dim:
            items.append(MemoryItem("kv_repeat", 2 * t * (f.q_dim - f.kv_dim) * a,
                                    "grouped-query k, v repeated to every head: 2 T (q - kv) a"))
        # the scores, their gradient and the probabilities' gradient in the backward
        backward_extra += 2 * batch * f.n_heads * seq * seq * a
    items.append(MemoryItem("lora", lora_in + ax, f"{len(ad)} adapters: inputs (fp32) + A x (T r 4)"))
    return LayerModel(tuple(items), forward_extra, backward_extra)


def layer_recompute(f: ModelFacts, batch: int, seq: int, rank: int, attention: str) -> MemoryItem:
    """One layer's recompute + backward on top of its checkpointed input (``saved`` + the
    larger of the forward and backward extras)."""
    m = layer_model(f, batch, seq, rank, attention)
    fwd = m.forward_extra >= m.backward_extra
    extra = MemoryItem("temporaries", max(m.forward_extra, m.backward_extra),
                       "forward peak: last projection" if fwd else
                       "backward peak: output, incoming gradient, MLP gradients")
    return summed("layer_recompute", list(m.saved) + [extra], f"one layer's recompute + backward ({attention} attention)")


def layer_forward(f: ModelFacts, batch: int, seq: int, attention: str) -> MemoryItem:
    """One layer's forward without autograd (inference, and training's forward walk), on
    top of its input. The block's Python locals live until it returns, so at the MLP's
    peak (Llama: the up projection; measured op by op) the attention tensors
    ``T (2q + 2kv) a`` (plus ``2 b H s^2 a`` on the math path), the residual and the norm
    output ``2 T h a`` are still alive, with silu(gate) and up's base output ``2 T f a`` and,
    when up is adapted, the fp32 delta and sum ``2 T f 4`` (and at ``a != 4`` the fp32
    input copy ``T h 4``). GPT-2: c_attn's output and the attention output ``4 T h a``, the
    residual and norm output ``2 T h a``, and the MLP with its GELU temporaries ``3 T f a``.
    """
    t, h, a, ff = batch * seq, f.hidden, f.act_bytes, f.ffn
    ad = _adapters(f)
    cast = a != FP32
    if f.formulas is LEARNED_FUSED:
        attn = 4 * t * h * a
        mlp = 3 * t * ff * a + (2 * t * ff * FP32 + (t * h * FP32 if cast else 0) if "mlp.c_fc" in ad else 0)
    else:
        attn = t * (2 * f.q_dim + 2 * f.kv_dim) * a
        up = "mlp.up_proj" in ad
        mlp = 2 * t * ff * a + (2 * t * ff * FP32 + (t * h * FP32 if cast else 0) if up else 0)
        down = "mlp.down_proj" in ad
        mlp = max(mlp, t * ff * a + t * h * a + (t * ff * FP32 * cast + 2 * t * h * FP32 if down else 0))
    if attention == "math":
        attn += 2 * batch * f.n_heads * seq * seq * a
    mlp += family_terms.forward_extra(f, batch, seq)
    return summed("layer_forward", [
        MemoryItem("attention", attn, "q, k, v and the attention output, held until the block returns"),
        MemoryItem("residual", 2 * t * h * a, "residual + norm output: 2 T h a"),
        MemoryItem("mlp", mlp, "the MLP's activations and the fp32 adapter delta"),
    ], f"one layer's forward ({attention} attention)")


def head_train(f: ModelFacts, batch: int, seq: int, chunk_tokens: int) -> MemoryItem:
    """The head's chunked loss + backward (:func:`lema.domain.model.heads.head_loss`).

    ``c = min(T, chunk_tokens)``. The final norm's saved fp32 input (``T h 4`` when
    ``a != 4``), its output and the gradient towards the hidden states ``2 T h a``, plus the
    larger of one chunk's fp32 logits and log-softmax ``2 c V 4`` and the norm's backward
    (``T h (a + 8)``: the returned gradient, fp32 temporaries).
    """
    t, h, a = batch * seq, f.hidden, f.act_bytes
    c = min(t, chunk_tokens)
    norm = (t * h * FP32 if a != FP32 else 0) if f.formulas is not LEARNED_FUSED else 0
    chunk, back = 2 * c * f.vocab * FP32, t * h * (a + 2 * FP32)
    return summed("head", [
        MemoryItem("final_norm", norm + 2 * t * FP32, "fp32 input T h 4 (a != 4)" if norm else "statistics"),
        MemoryItem("hidden", 2 * t * h * a, "norm output + gradient: 2 T h a"),
        MemoryItem("logits" if chunk >= back else "norm_backward", max(chunk, back),
                   f"{c} tokens per chunk: fp32 logits + log-softmax 2 c V 4" if chunk >= back else "T h (a + 8)"),
    ], f"chunked loss + backward, {c} tokens per chunk")


def head_inference(f: ModelFacts, batch: int, seq: int) -> MemoryItem:
    """``LemaModel.forward``'s head: the final norm ``T h a`` and the full float32 logits it
    returns, ``T V 4`` (plus the compute-dtype logits ``T V a`` before the upcast)."""
    t, a = batch * seq, f.act_bytes
    return summed("head", [MemoryItem("final_norm", t * f.hidden * a, "T h a"),
                           MemoryItem("logits", t * f.vocab * (FP32 + (a if a != FP32 else 0)), "T V (4 + a)")],
                  "full float32 logits")


def batch_context(f: ModelFacts, batch: int, seq: int, train: bool) -> MemoryItem:
    """Per-step tensors made before the first layer: rotary cos/sin ``2 T d a`` (Llama
    family), positions ``s 8`` and (training) the shifted targets ``T 8``."""
    t = batch * seq
    rope = 2 * t * f.head_dim * f.act_bytes if f.formulas is not LEARNED_FUSED else 0
    return MemoryItem("batch_context", rope + seq * 8 + (t * 8 if train else 0), "rope tables, positions, targets")


def peak_of(name: str, phases: Sequence[MemoryItem], note: str = "") -> MemoryItem:
    """An item whose bytes are the largest of its parts (phases that never coexist)."""
    kept = tuple(p for p in phases if p.bytes)
    if not kept:
        return MemoryItem(name, 0, note)
    top = max(kept, key=lambda p: p.bytes)
    return MemoryItem(name, top.bytes, f"{note}{'; ' if note else ''}peak: {top.name}", kept, "max")


def wide_matmul_head(f: ModelFacts, batch: int, seq: int, chunk_tokens: int) -> MemoryItem:
    """The head's products computed wide (:mod:`lema.domain.nn.matmul`). At the head's peak
    (the gradient towards the hidden states, ``g @ W``) the fp32 probabilities and their
    half-precision cast are joined by an fp32 copy of the cast (``c V 4`` where the plain
    path's ``2 c V 4`` holds ``c V 6``: ``c V 2`` more), the fp32 weight ``V h 4`` and the fp32
    product ``c h 4``."""
    c = min(batch * seq, chunk_tokens)
    return MemoryItem("wide_matmul", f.vocab * f.hidden * FP32 + c * f.vocab * 2 + c * f.hidden * FP32,
                      "fp32 weight V h 4 + c V 2 + c h 4")
