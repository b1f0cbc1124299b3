"""What a layer of the newer families holds beyond a Llama layer's: routed experts, extra norms,
eager attention scores, a fused qkv (pure arithmetic, the notation of :mod:`.items`).

Each family says which terms apply (:class:`~lema.domain.nn.layout.PlanTerms`, and its
expert counts in the spec); :mod:`.items` adds them to the Llama layer's working set. The
functions take its ``ModelFacts`` and return ``(name, bytes, note)`` terms.
Measured op by op against the blocks with the allocation counter, as the Llama terms were:

* routed experts (Mixtral, Qwen3-MoE): every token runs ``k`` experts of width ``f_e``;
  at the layer's peak (its backward runs one expert at a time, freeing as it goes) that
  measures as ``2 T k f_e a`` of SwiGLU activations (a Llama layer keeps ``3 T f a``) and
  ``3 T k h a`` of per-(token, expert) inputs, outputs and their gradients, plus the
  router's fp32 softmax ``T E 4``; the outputs' gradient ``T k h a`` in the backward.
  Routing weights kept in fp32 (Mixtral) at ``a != 4`` add an fp32 copy of the outputs
  ``T k h 4``;
* q/k norms: their fp32 inputs ``T w 4`` (``w`` the norms' summed width);
* post-norms (Gemma): their fp32 inputs and the sub-layer outputs ``T w (4 + a)``;
* eager soft-capped scores (Gemma 2): the capped scores and the probabilities
  ``2 b H s^2 4``;
* fused projections (Phi-3): q and k live on inside the fused qkv output ``T (q + kv) a``,
  and an adapted gate_up's fp32 LoRA delta and sum peak at ``3.5 T f 4`` in the recompute.
"""

from __future__ import annotations

from typing import Any

from lema.domain.units import format_size

FP32 = 4
Term = tuple[str, int, str]  # (name, bytes, note): a MemoryItem's fields


def mlp_saved(f: Any, t: int) -> Term:
    """The MLP's saved activations: a dense SwiGLU's ``3 T f a``, or the routed experts'."""
    a = f.act_bytes
    if not f.experts:
        return "mlp", 3 * t * f.ffn * a, "SwiGLU gate, silu, up: 3 T f a"
    routed = 2 * t * f.top_k * f.expert_ffn * a + 3 * t * f.top_k * f.hidden * a + t * f.experts * FP32
    dense = 3 * t * f.dense_ffn * a
    note = (f"routed: {f.top_k} of {f.experts} experts, 2 T k f_e a + 3 T k h a + router T E 4"
            + (f" (a dense layer: 3 T f a = {format_size(dense)})" if dense > routed else ""))
    return "experts", max(routed, dense), note


def saved(f: Any, batch: int, seq: int) -> list[Term]:
    """The saved activations a family adds to a Llama layer's (norms, scores, fused qkv)."""
    t, a = batch * seq, f.act_bytes
    out = []
    norms = t * f.qk_norm_width * FP32 + t * f.post_norm_width * (FP32 + a)
    if norms:
        out.append(("extra_norms", norms, "q/k norms T w 4, post-norms T w (4 + a)"))
    if f.eager_scores:
        out.append(("eager_scores", 2 * batch * f.n_heads * seq * seq * FP32,
                    "soft-capped scores and probabilities: 2 b H s^2 4"))
    if f.fused_qkv:
        out.append(("fused_qkv", t * (f.q_dim + f.kv_dim) * a, "the fused qkv output: T (q + kv) a"))
    return out


def recompute_extra(f: Any, t: int, gate_up_adapted: bool) -> int:
    """The recompute's forward peak where a fused gate_up projection is adapted (Phi-3): its
    fp32 LoRA delta and sum, twice a Llama up projection's, with the fused output (measured:
    ``3.5 T f 4``)."""
    return 7 * t * f.ffn * FP32 // 2 if f.fused_qkv and gate_up_adapted else 0


def backward_extra(f: Any, t: int) -> int:
    """Backward temporaries beyond a Llama layer's (the routed experts')."""
    if not f.experts:
        return 0
    a = f.act_bytes
    fp32_weights = t * f.top_k * f.hidden * FP32 if f.router_fp32 and a != FP32 else 0
    return t * f.top_k * f.hidden * a + fp32_weights


def forward_extra(f: Any, batch: int, seq: int) -> int:
    """The no-grad forward's extra peak: the experts' outputs and router, the eager scores."""
    t, a = batch * seq, f.act_bytes
    extra = 0
    if f.experts:
        extra += t * f.top_k * f.hidden * (a + (FP32 if f.router_fp32 else 0)) + t * f.experts * FP32
    if f.eager_scores:
        extra += 3 * batch * f.n_heads * seq * seq * FP32
    return extra
