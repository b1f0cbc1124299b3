"""The two decoder layers most families are made of, with what differs between them as options.

* :func:`pre_norm_layer`: RMSNorm before attention and before the MLP (Llama, Mistral, Qwen2,
  Qwen3 with per-head q/k norms, and the attention half of Mixtral and Qwen3-MoE, whose MLP
  is their own);
* :func:`sandwich_layer`: Gemma's ``1 + w`` norms before *and after* attention and the MLP
  (Gemma 2 with soft-capped scores, Gemma 3 with q/k norms).

Each family's ``block`` calls one of them with its options, so the layer reads in one
place. The operations run in the order of the transformers layer each one mirrors, and
every intermediate (q, k, v, the attention output) lives until the layer returns, as the
planner's measured working sets assume (:mod:`lema.domain.plan.stages`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from lema.domain.nn import attention, norms
from lema.domain.nn.layout import GATE_UP, QKV

if TYPE_CHECKING:
    import torch

    from lema.domain.nn.attention import KVHook
    from lema.domain.nn.context import BlockContext
    from lema.domain.nn.decoder_io import DecoderParams
    from lema.domain.nn.linear import Projector, Weights

__all__ = ["pre_norm_layer", "sandwich_layer", "swiglu"]




def swiglu(proj: Projector, h: torch.Tensor, activation: str) -> torch.Tensor:
    """``down(act(gate(h)) * up(h))``, the gated MLP."""
    act = norms.activation(activation)
    gate, up = proj.many(h, GATE_UP)
    return proj(act(gate) * up, "mlp.down_proj")


def pre_norm_layer(p: DecoderParams, w: Weights, proj: Projector, x: torch.Tensor, ctx: BlockContext, layer: int,
                   kv_hook: KVHook | None = None, *, qk_norm: bool = False,
                   mlp: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``x + attention(norm(x))``, then ``+ mlp(norm(x))`` (``LlamaDecoderLayer``).

    Args:
        qk_norm: RMSNorm each head of q and k (``self_attn.{q,k}_norm``: Qwen3).
        mlp: the MLP on the post-attention norm's output; None: :func:`swiglu`.
    """
    batch, seq, _ = x.shape
    h = norms.rms_norm(x, w["input_layernorm.weight"], p.eps)
    q, k, v = (t.view(batch, seq, -1, p.head_dim) for t in proj.many(h, QKV))
    if qk_norm:
        q = norms.rms_norm(q, w["self_attn.q_norm.weight"], p.eps)
        k = norms.rms_norm(k, w["self_attn.k_norm.weight"], p.eps)
    a = attention.self_attention(q, k, v, ctx, p.layout.layer_types[layer], scale=p.head_dim ** -0.5,
                                 kv_hook=kv_hook)
    x = x + proj(a, "self_attn.o_proj")
    h = norms.rms_norm(x, w["post_attention_layernorm.weight"], p.eps)
    return x + (swiglu(proj, h, p.activation) if mlp is None else mlp(h))


def sandwich_layer(p: DecoderParams, w: Weights, proj: Projector, x: torch.Tensor, ctx: BlockContext, layer: int,
                   kv_hook: KVHook | None = None, *, scale: float, qk_norm: bool = False,
                   softcap: float | None = None) -> torch.Tensor:
    """Gemma's layer: ``1 + w`` RMSNorms before and after attention and the MLP.

    Args:
        scale: the attention scale (``query_pre_attn_scalar ** -0.5``).
        qk_norm: ``1 + w`` RMSNorm each head of q and k after the projections (Gemma 3).
        softcap: soft-cap the attention scores (Gemma 2), computed eagerly.
    """
    batch, seq, _ = x.shape
    h = norms.rms_norm_gemma(x, w["input_layernorm.weight"], p.eps)
    q, k, v = (t.view(batch, seq, -1, p.head_dim) for t in proj.many(h, QKV))
    if qk_norm:
        q = norms.rms_norm_gemma(q, w["self_attn.q_norm.weight"], p.eps)
        k = norms.rms_norm_gemma(k, w["self_attn.k_norm.weight"], p.eps)
    a = attention.self_attention(q, k, v, ctx, p.layout.layer_types[layer], scale=scale, kv_hook=kv_hook,
                                 softcap=softcap)
    x = x + norms.rms_norm_gemma(proj(a, "self_attn.o_proj"), w["post_attention_layernorm.weight"], p.eps)
    h = norms.rms_norm_gemma(x, w["pre_feedforward_layernorm.weight"], p.eps)
    m = swiglu(proj, h, p.activation)
    return x + norms.rms_norm_gemma(m, w["post_feedforward_layernorm.weight"], p.eps)
