"""Functional transformer math: embedding and decoder blocks as plain functions.

Every function takes the model's :class:`~lema.domain.model.spec.ModelSpec`, a dict of one unit's
weights (keyed by in-unit key, e.g. ``self_attn.q_proj.weight``), the layer's LoRA adapters
(``module_key -> (A, B)``, or None) and the activations. No module object outlives a call,
so one layer's adapters can never leak into another's. The math mirrors transformers 5
(``LlamaDecoderLayer`` with SDPA attention, ``GPT2Block``) and PEFT's ``lora.Linear``, so
outputs and LoRA gradients match them.

The frozen base model's own dropouts (GPT-2's ``embd_pdrop``/``attn_pdrop``/``resid_pdrop``,
the Llama family's ``attention_dropout``) are not applied: only LoRA dropout is, so training
matches transformers with those set to 0 (:func:`lema.domain.families.registry.base_dropouts`
lists them; the model warns when they are not zero).

Example:
    >>> import torch
    >>> from lema.domain.model.spec import ModelSpec
    >>> from lema.domain.model.context import make_context
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100}
    >>> spec = ModelSpec.from_config(cfg, dtype="F32")
    >>> weights = {t.key: torch.randn(t.shape) * 0.02 for t in spec.units[1].tensors}
    >>> ctx = make_context(spec, (2, 7))
    >>> decoder_block(spec, weights, None, torch.randn(2, 7, 64), ctx).shape
    torch.Size([2, 7, 64])
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from lema.domain.model.context import BlockContext
from lema.domain.model.lora import MODULE_KEYS
from lema.domain.model.matmul import frozen_linear
from lema.domain.model.rope import apply_rope
from lema.domain.model.spec import ModelSpec
from lema.errors import ModelFormatError

Weights = Mapping[str, torch.Tensor]
Adapters = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
# Called with a layer's new keys and values (after rope), ``(batch, kv_heads, seq, head_dim)``;
# returns the keys and values to attend over (e.g. the KV cache's past ones prepended).
KVHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation, written out (F.gelu(approximate="tanh") differs by ~1 ulp).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu, "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu_fast": _gelu_new,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function a config names (``hidden_act`` / ``activation_function``).

    Raises:
        ModelFormatError: for an activation LEMA does not implement.
    """
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelFormatError(f"config.json: activation {name!r} is not supported; "
                               f"LEMA implements {', '.join(sorted(_ACTIVATIONS))}") from None


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, cast back, then scale (as ``LlamaRMSNorm``)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * h.to(x.dtype)


def _lora_delta(x: torch.Tensor, adapter: tuple[torch.Tensor, torch.Tensor], ctx: BlockContext,
                site: int) -> torch.Tensor:
    """PEFT's ``lora_B(lora_A(dropout(x))) * scaling`` with ``x`` cast to the adapter dtype."""
    a, b = adapter
    h = x.to(a.dtype)
    if ctx.lora_dropout > 0.0:
        # One seeded generator per (layer, module): a recomputed layer redraws the same mask.
        gen = torch.Generator(device=h.device).manual_seed((ctx.dropout_seed + 7919 * site) % (2**63 - 1))
        keep = torch.empty_like(h).bernoulli_(1.0 - ctx.lora_dropout, generator=gen)
        h = h * keep / (1.0 - ctx.lora_dropout)
    return F.linear(F.linear(h, a), b) * ctx.lora_scaling


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapter: tuple | None,
           ctx: BlockContext, *, conv1d: bool = False, site: int = 0) -> torch.Tensor:
    """A frozen linear map plus an optional LoRA update.

    Args:
        x: ``(..., in)`` activations in the compute dtype.
        weight: ``[out, in]`` (``nn.Linear``) or ``[in, out]`` when ``conv1d`` (GPT-2).
        bias: ``[out]`` or None.
        adapter: ``(A, B)`` or None.
        ctx: the batch context (scaling, dropout).
        conv1d: the weight has GPT-2's Conv1D ``[in, out]`` layout.
        site: a number unique to this module in the model, seeding its dropout mask.

    Returns:
        ``(..., out)`` activations in ``x``'s dtype.
    """
    if ctx.matmul_dtype is not None and ctx.matmul_dtype != x.dtype:
        out = frozen_linear(x, weight.to(x.dtype), _cast(bias, x.dtype), conv1d=conv1d,
                            matmul_dtype=ctx.matmul_dtype)
        if adapter is None:
            return out
        return (out + _lora_delta(x, adapter, ctx, site)).to(out.dtype)
    w, b = weight.to(x.dtype), _cast(bias, x.dtype)
    if conv1d:
        flat = x.reshape(-1, x.shape[-1])
        out = (torch.addmm(b, flat, w) if b is not None else flat @ w).view(*x.shape[:-1], w.shape[-1])
    else:
        out = F.linear(x, w, b)
    if adapter is None:
        return out
    return (out + _lora_delta(x, adapter, ctx, site)).to(out.dtype)


def embed(spec: ModelSpec, weights: Weights, input_ids: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    """Token (and, for GPT-2, learned position) embeddings, ``(batch, seq, hidden)`` in ``ctx.dtype``.

    GPT-2's ``wte + wpe`` is summed in ``ctx.dtype`` (the compute dtype), as transformers
    does with weights loaded in that dtype: a bf16 file run as float32 sums in float32.
    """
    if spec.family == "gpt2":
        tokens = F.embedding(input_ids, weights["wte.weight"]).to(ctx.dtype)
        return tokens + F.embedding(ctx.position_ids, weights["wpe.weight"]).to(ctx.dtype)
    return F.embedding(input_ids, weights["embed_tokens.weight"]).to(ctx.dtype)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext, layer_type: str,
               scale: float) -> torch.Tensor:
    """SDPA over ``(batch, heads, seq, head_dim)`` tensors; returns ``(batch, seq, heads * head_dim)``."""
    mask, keep = ctx.attention(layer_type)
    groups = q.shape[1] // k.shape[1]
    kwargs = {}
    if groups > 1 and mask is None:
        kwargs["enable_gqa"] = True
    elif groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    # No mask means causal; with a single query row (a cached decode step) that is every key,
    # and SDPA's ``is_causal`` would align it to the first key instead.
    causal = mask is None and q.shape[2] > 1
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kwargs)
    if keep is not None:
        out = out * keep.to(out.dtype)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _llama_block(spec: ModelSpec, w: Weights, lora: Adapters, x: torch.Tensor, ctx: BlockContext,
                 layer: int, kv_hook: KVHook | None = None) -> torch.Tensor:
    sites = {key: layer * 16 + j for j, key in enumerate(MODULE_KEYS["llama"])}

    def proj(h: torch.Tensor, key: str) -> torch.Tensor:
        return linear(h, w[key + ".weight"], w.get(key + ".bias"), lora.get(key), ctx, site=sites[key])

    batch, seq, _ = x.shape
    p, hd = ctx.params, spec.head_dim
    h = rms_norm(x, w["input_layernorm.weight"], p.norm_eps)
    q = proj(h, "self_attn.q_proj").view(batch, seq, -1, hd).transpose(1, 2)
    k = proj(h, "self_attn.k_proj").view(batch, seq, -1, hd).transpose(1, 2)
    v = proj(h, "self_attn.v_proj").view(batch, seq, -1, hd).transpose(1, 2)
    if ctx.rope is None:
        raise ModelFormatError("the context has no rope tables; build it with make_context for this spec")
    q, k = apply_rope(q, k, *ctx.rope)
    if kv_hook is not None:
        k, v = kv_hook(k, v)
    attn = _attention(q, k, v, ctx, p.layer_types[layer], hd ** -0.5)
    x = x + proj(attn, "self_attn.o_proj")
    h = rms_norm(x, w["post_attention_layernorm.weight"], p.norm_eps)
    act = activation(p.activation)
    return x + proj(act(proj(h, "mlp.gate_proj")) * proj(h, "mlp.up_proj"), "mlp.down_proj")


def _gpt2_block(spec: ModelSpec, w: Weights, lora: Adapters, x: torch.Tensor, ctx: BlockContext,
                layer: int, kv_hook: KVHook | None = None) -> torch.Tensor:
    sites = {key: layer * 16 + j for j, key in enumerate(MODULE_KEYS["gpt2"])}

    def proj(h: torch.Tensor, key: str) -> torch.Tensor:
        return linear(h, w[key + ".weight"], w[key + ".bias"], lora.get(key), ctx, conv1d=True, site=sites[key])

    def norm(h: torch.Tensor, key: str) -> torch.Tensor:
        return F.layer_norm(h, (h.shape[-1],), w[key + ".weight"].to(h.dtype), w[key + ".bias"].to(h.dtype),
                            ctx.params.norm_eps)

    batch, seq, hidden = x.shape
    p, hd = ctx.params, spec.head_dim
    q, k, v = (t.view(batch, seq, -1, hd).transpose(1, 2)
               for t in proj(norm(x, "ln_1"), "attn.c_attn").split(hidden, dim=2))
    if kv_hook is not None:
        k, v = kv_hook(k, v)
    scale = hd ** -0.5 if p.scale_attn_weights else 1.0
    if p.scale_attn_by_inverse_layer_idx:
        scale /= float(layer + 1)
    x = x + proj(_attention(q, k, v, ctx, p.layer_types[layer], scale), "attn.c_proj")
    return x + proj(activation(p.activation)(proj(norm(x, "ln_2"), "mlp.c_fc")), "mlp.c_proj")


def decoder_block(spec: ModelSpec, weights: Weights, lora: Adapters | None, x: torch.Tensor,
                  ctx: BlockContext, layer: int = 0) -> torch.Tensor:
    """One decoder layer: ``x_out = block(x)``.

    Args:
        spec: the model.
        weights: the layer's tensors by in-unit key (``spec.units[layer + 1]``), any dtype.
        lora: ``module_key -> (A, B)`` for this layer (``LoraState.layer(layer)``) or None.
        x: ``(batch, seq, hidden)`` activations in ``ctx.dtype``.
        ctx: the batch context from :func:`lema.domain.model.context.make_context`.
        layer: 0-based layer index (sliding-window layers, GPT-2's inverse-layer scaling,
            and the seed of this layer's LoRA dropout masks).

    Returns:
        ``(batch, seq, hidden)`` in ``x``'s dtype.
    """
    block = _gpt2_block if spec.family == "gpt2" else _llama_block
    return block(spec, weights, lora or {}, x, ctx, layer)


def decoder_block_kv(spec: ModelSpec, weights: Weights, lora: Adapters | None, x: torch.Tensor,
                     ctx: BlockContext, layer: int, kv_hook: KVHook) -> torch.Tensor:
    """:func:`decoder_block` with a hook between the key/value projections and attention.

    ``kv_hook(k, v)`` receives this call's keys (rotated, for the Llama family) and values,
    ``(batch, kv_heads, seq, head_dim)`` in ``x``'s dtype, and returns the keys and values to
    attend over; :mod:`lema.domain.model.decode` uses it to prepend a layer's KV cache. The queries
    are this call's ``seq`` positions, so ``ctx`` must carry masks of shape
    ``(batch, 1, seq, keys)`` (:func:`lema.domain.model.context.make_decode_context`).

    Returns:
        ``(batch, seq, hidden)`` in ``x``'s dtype.
    """
    block = _gpt2_block if spec.family == "gpt2" else _llama_block
    return block(spec, weights, lora or {}, x, ctx, layer, kv_hook)
