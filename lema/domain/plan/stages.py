"""The working set of a decoder layer's stages, whole or over sequence tiles (pure).

A layer runs in three stages (:mod:`lema.domain.model.blocks`): *pre* (norm, q/k/v
projections, rope) and *post* (output projection, residual, norm, MLP, residual) treat each
token on its own; attention mixes them. The per-token functions below give the bytes one
token of a stage holds at the stage's peak; a layer run whole holds them for ``T`` tokens,
a tiled layer (:mod:`lema.domain.model.tiling`) for ``R = batch * tile`` rows, next to
the whole-sequence tensors it keeps across tiles. Notation as in
:mod:`lema.domain.plan.items`; ``cast`` means ``a != 4`` (LoRA works in fp32, so an adapter
copies its input to fp32).

Measured op by op with the CPU device's allocation counter on Llama and GPT-2 shapes in
fp32 and bf16 (``benchmarks`` of issue 14): the whole-sequence terms exactly; the
per-token stage terms within ~10%, which is a few percent of a tiled layer, whose tiles
are a fraction of the sequence. Attention's terms are those of PyTorch's fused SDPA
kernels on the tensor layouts the blocks pass: no-grad, the output and its
``(batch, seq, heads * head_dim)`` copy (``2 T q a``); with autograd, the output plus its
fp32 log-sum-exp ``T H 4``; its backward, ``dq, dk, dv``.
"""

from __future__ import annotations

from lema.domain.nn.layout import LayerFormulas
from lema.domain.plan.items import FP32, MemoryItem, ModelFacts, peak_of, summed

LEARNED_FUSED = LayerFormulas.LEARNED_FUSED


def _adapted(f: ModelFacts, *keys: str) -> bool:
    return any(k in f.lora_keys for k in keys)


def pre_forward_token(f: ModelFacts) -> int:
    """One token of the pre-attention stage without autograd: at rope (Llama), the norm
    output, the projections and the rotation's temporaries ``max(h + 4q + 2kv, h + 2q +
    5kv) a`` (+ ``4 h`` fp32 copies when cast); GPT-2: norm and c_attn with its fp32
    delta, ``10 h a`` (+ ``16 h``)."""
    h, q, kv, a = f.hidden, f.q_dim, f.kv_dim, f.act_bytes
    cast = a != FP32
    if f.formulas is LEARNED_FUSED:
        return 10 * h * a + cast * 16 * h
    return max(h + 4 * q + 2 * kv, h + 2 * q + 5 * kv) * a + cast * 4 * h


def post_forward_token(f: ModelFacts) -> int:
    """One token of a replayed tile without autograd (the family's block, its attention
    replaced by the precomputed rows): the tile's own q, k, v ``(q + 2kv) a``, recomputed by
    the block and alive until it returns (GPT-2: ``2 h a``), the residual and norm output
    ``2 h a`` plus the MLP's peak: ``3 f a`` at the SwiGLU product, or with ``up`` adapted
    the activation, up's output and its fp32 delta and sum ``2 f a + 8 f`` (+ the fp32
    norm copy ``4 h`` when cast), or with ``down`` adapted its input, output and fp32 delta
    ``f a + h a + 8 h`` (+ ``4 f``). GPT-2: ``4 f a`` for the written-out tanh GELU, or
    ``2 f a + 8 f`` with c_fc adapted."""
    h, ff, a = f.hidden, f.ffn, f.act_bytes
    cast = a != FP32
    if f.formulas is LEARNED_FUSED:
        return 4 * h * a + max(4 * ff * a, _adapted(f, "mlp.c_fc") * (2 * ff * a + 8 * ff))
    up = _adapted(f, "mlp.up_proj")
    down = _adapted(f, "mlp.down_proj")
    mlp = max(3 * ff * a, up * (2 * ff * a + 8 * ff), down * (ff * a + h * a + cast * 4 * ff + 8 * h))
    return (f.q_dim + 2 * f.kv_dim) * a + 2 * h * a + up * cast * 4 * h + mlp


def pre_backward_token(f: ModelFacts) -> int:
    """One token of the pre-attention stage recomputed and backpropagated (the incoming
    q/k/v gradients not counted): ``(2h + 4q + 3kv) a`` (+ ``4 (h + q + 2kv)`` when cast);
    GPT-2 ``10 h a`` (+ ``20 h``)."""
    h, q, kv, a = f.hidden, f.q_dim, f.kv_dim, f.act_bytes
    cast = a != FP32
    if f.formulas is LEARNED_FUSED:
        return 10 * h * a + cast * 20 * h
    return (2 * h + 4 * q + 3 * kv) * a + cast * 4 * (h + q + 2 * kv)


def post_backward_token(f: ModelFacts, rank: int) -> int:
    """One token of a replayed tile recomputed and backpropagated, with the gradients it
    returns: ``(3h + 6f) a`` (GPT-2 ``(3h + 7f) a``), plus ``3 r 4`` for the adapters'
    ``A x`` and, when cast, the adapters' fp32 input copies. When cast, the tile's forward
    peaks higher than its backward: the block's recomputed q, k, v and their graph (the
    norm's and the q/k/v adapters' fp32 copies of their input, ``A x``) are alive through
    it: ``(q + 2kv) a + 4 h (1 + n) + n r 4`` more for ``n`` adapted q/k/v projections."""
    h, q, ff, a = f.hidden, f.q_dim, f.ffn, f.act_bytes
    cast = a != FP32
    if f.formulas is LEARNED_FUSED:
        o, up, down = _adapted(f, "attn.c_proj"), _adapted(f, "mlp.c_fc"), _adapted(f, "mlp.c_proj")
        base = (3 * h + 7 * ff) * a
        copies = cast * (o * 4 * q + up * 4 * h + down * 4 * ff)
    else:
        o, down = _adapted(f, "self_attn.o_proj"), _adapted(f, "mlp.down_proj")
        up = _adapted(f, "mlp.gate_proj", "mlp.up_proj")
        n_up = _adapted(f, "mlp.gate_proj") + _adapted(f, "mlp.up_proj")
        base = (3 * h + 6 * ff) * a
        copies = cast * (o * 4 * q + n_up * 4 * h + down * 4 * ff)
    n_pre = sum(_adapted(f, k) for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.qkv_proj", "attn.c_attn"))
    # (measured on Llama shapes; GPT-2's fused c_attn keeps less, below its backward's peak)
    rotary = f.formulas is not LEARNED_FUSED
    pre_graph = cast * rotary * ((f.q_dim + 2 * f.kv_dim) * a + 4 * h * (1 + n_pre) + n_pre * rank * FP32)
    return base + copies + (o or up or down) * 3 * rank * FP32 + pre_graph


def _scores(f: ModelFacts, batch: int, seq: int, attention: str, k: int) -> list[MemoryItem]:
    if attention != "math":
        return []
    return [MemoryItem("attention_scores", k * batch * f.n_heads * seq * seq * f.act_bytes,
                       f"math attention: {k} b H s^2 a")]


def tiled_forward(f: ModelFacts, batch: int, seq: int, tile: int, attention: str) -> MemoryItem:
    """One layer's forward without autograd over tiles of ``tile`` positions
    (``R = batch * tile`` rows), on top of its input: q, k, v of the whole sequence
    ``T (q + 2kv) a`` filled tile by tile, attention's output and its copy ``2 T q a``,
    then the output ``T h a`` filled tile by tile next to the attention output."""
    t, rows, h, q, kv, a = batch * seq, batch * min(tile, seq), f.hidden, f.q_dim, f.kv_dim, f.act_bytes
    qkv = MemoryItem("qkv", t * (q + 2 * kv) * a, "q, k, v of the whole sequence: T (q + 2kv) a")
    return peak_of("layer_forward", [
        summed("pre_attention", [qkv, MemoryItem("tile", rows * pre_forward_token(f), f"{rows} rows")]),
        summed("attention", [qkv, MemoryItem("attention_output", 2 * t * q * a, "output + its copy: 2 T q a")]
               + _scores(f, batch, seq, attention, 2)),
        summed("post_attention", [MemoryItem("output", t * h * a, "T h a"),
                                  MemoryItem("attention_output", t * q * a, "T q a"),
                                  MemoryItem("tile", rows * post_forward_token(f), f"{rows} rows")]),
    ], f"one layer's forward over {min(tile, seq)}-position tiles ({attention} attention)")


def tiled_backward(f: ModelFacts, batch: int, seq: int, tile: int, rank: int, attention: str) -> MemoryItem:
    """One layer's recompute + backward over tiles (:func:`lema.domain.model.tiling.tiled_backward`),
    on top of its input: the incoming gradient ``T h a`` (overwritten with the result)
    plus the largest of three steps:

    * post tiles: q, k, v ``T (q + 2kv) a``, attention's output, its copy and log-sum-exp
      ``2 T q a + T H 4``, the attention gradient ``T q a`` and one tile's post stage;
    * attention's backward: the same plus ``dq, dk, dv`` ``T (q + 2kv) a``;
    * pre tiles: ``dq, dk, dv`` and one tile's pre stage.

    In the tile steps the layer's LoRA gradients summed over the tiles and one tile's
    ``2 G`` (fp32) are alive too; they are handed to autograd once at the end.
    """
    t, rows, h, q, kv, a = batch * seq, batch * min(tile, seq), f.hidden, f.q_dim, f.kv_dim, f.act_bytes
    qkv = MemoryItem("qkv", t * (q + 2 * kv) * a, "q, k, v: T (q + 2kv) a")
    attn = MemoryItem("attention_saved", 2 * t * q * a + t * f.n_heads * FP32, "output, copy, log-sum-exp")
    grad_attn = MemoryItem("attention_gradient", t * q * a, "T q a")
    dqkv = MemoryItem("qkv_gradients", t * (q + 2 * kv) * a, "dq, dk, dv: T (q + 2kv) a")
    held = [qkv, attn, grad_attn] + _scores(f, batch, seq, attention, 1)
    g = rank * sum(i + o for i, o in f.lora_modules) * FP32
    sums = MemoryItem("lora_gradient_sums", 2 * g, "a layer's LoRA gradients, summed over tiles and one tile's: 2 G")
    steps = peak_of("steps", [
        summed("post_tiles", held + [sums, MemoryItem("tile", rows * post_backward_token(f, rank), f"{rows} rows")]),
        summed("attention_backward", held + [sums, dqkv] + _scores(f, batch, seq, attention, 2)),
        summed("pre_tiles", [dqkv, sums, MemoryItem("tile", rows * pre_backward_token(f), f"{rows} rows")]),
    ])
    return summed("layer_recompute", [MemoryItem("incoming_gradient", t * h * a, "T h a, overwritten with dL/dx"),
                                      steps],
                  f"one layer's recompute + backward over {min(tile, seq)}-position tiles ({attention} attention)")


def block_sparse_attention(f: ModelFacts, batch: int, seq: int) -> MemoryItem:
    """Attention by blocks (:func:`lema.domain.nn.attention._block_sparse`: per packed example,
    per window band) concatenates its parts' outputs, per row and then over the rows, next to
    the parts autograd keeps: one more attention output ``T q a`` than one fused call holds
    (measured on CpuDevice: 0.98-0.99 ``T q a`` on top of the unpacked step's peak)."""
    return MemoryItem("block_sparse_attention", batch * seq * f.q_dim * f.act_bytes,
                      "the parts' outputs concatenated: one more T q a")
