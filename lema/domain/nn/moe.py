"""A routed mixture of SwiGLU experts (Mixtral, Qwen3-MoE), as transformers 5 computes it.

The router scores every token against every expert (``h @ Wr.T`` in the activations'
dtype), softmaxes the scores in fp32 over all experts, keeps the top-k, optionally
renormalises them to sum to one, and mixes the chosen experts' outputs with those
weights. The experts' weights stay per-expert tensors (what ``save_pretrained`` writes:
``experts.{e}.w1/w3/w2`` for Mixtral, ``experts.{e}.gate_proj/up_proj/down_proj`` for
Qwen3-MoE); each expert runs on the tokens routed to it only, found with one sort and one
device -> host read of the experts' token counts per layer (not one wait per expert). The top-k sum follows
transformers' default ``grouped_mm`` experts path: the per-(token, k) outputs are weighted
and summed over k, then cast once.

Example:
    >>> import torch
    >>> from lema.domain.nn.context import BlockContext
    >>> ctx = BlockContext(dtype=torch.float32, position_ids=torch.zeros(1, 2, dtype=torch.long), ropes={},
    ...                    masks={}, params=None)
    >>> experts = [(torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)) for _ in range(3)]
    >>> routed_experts(torch.randn(1, 2, 4), torch.randn(3, 4), experts.__getitem__, 3, 2, torch.nn.functional.silu,
    ...                ctx, renormalize=True, weights_in_hidden_dtype=False).shape
    torch.Size([1, 2, 4])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from lema.domain.nn.linear import linear

if TYPE_CHECKING:
    from lema.domain.nn.context import BlockContext

# expert index -> (gate [I, H], up [I, H], down [H, I]) weights
ExpertWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def routed_experts(x: torch.Tensor, router: torch.Tensor, expert: ExpertWeights, n_experts: int, top_k: int,
                   act: Callable[[torch.Tensor], torch.Tensor], ctx: "BlockContext", *, renormalize: bool,
                   weights_in_hidden_dtype: bool) -> torch.Tensor:
    """The mixture's output for ``x`` ``(batch, seq, hidden)``, in ``x``'s dtype.

    Args:
        x: the normalised hidden states.
        router: ``[n_experts, hidden]``, the router's weight.
        expert: the weights of expert ``e`` (frozen; no LoRA on experts).
        n_experts, top_k: experts in the layer, experts per token.
        act: the experts' activation (SwiGLU: ``down(act(gate(x)) * up(x))``).
        ctx: the batch context (the products' dtype).
        renormalize: divide the top-k weights by their sum (Mixtral always; Qwen3-MoE with
            ``norm_topk_prob``).
        weights_in_hidden_dtype: cast the routing weights to ``x``'s dtype before mixing
            (Qwen3-MoE); Mixtral keeps them fp32.
    """
    batch, seq, hidden = x.shape
    flat = x.reshape(-1, hidden)
    logits = linear(flat, router, None, None, ctx)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, chosen = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_in_hidden_dtype:
        weights = weights.to(x.dtype)
    pairs = flat.new_zeros(flat.shape[0], top_k, hidden)
    # One stable sort groups the (token, k) pairs by expert, in the order torch.where(chosen == e)
    # lists them; the experts' pair counts are the layer's one device -> host read.
    choices = chosen.reshape(-1)
    order = torch.argsort(choices, stable=True)
    counts = torch.bincount(choices, minlength=n_experts).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        picked = order[start:start + count]
        start += count
        tokens, slot = picked // top_k, picked % top_k
        gate, up, down = expert(e)
        h = flat[tokens]
        y = linear(act(linear(h, gate, None, None, ctx)) * linear(h, up, None, None, ctx), down, None, None, ctx)
        pairs.index_put_((tokens, slot), y)
    out = (pairs * weights[..., None]).sum(dim=1).to(x.dtype)
    return out.reshape(batch, seq, hidden)
