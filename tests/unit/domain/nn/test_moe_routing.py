"""MoE routing reads the device once per layer (issue 23): one sort and one read of the
experts' token counts, not a ``torch.where`` (a host wait) per expert; the output is the
per-expert ``torch.where`` loop's to the bit (the same products on the same rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lema.domain.nn.context import BlockContext
from lema.domain.nn.linear import linear
from lema.domain.nn.moe import routed_experts
from tests.host_reads import HostReads

HIDDEN, INNER, EXPERTS, TOP_K = 16, 24, 8, 2


def _where_per_expert(x, router, expert, ctx, renormalize, weights_in_hidden_dtype):
    """The routing LEMA had before: one ``torch.where`` per expert."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(linear(flat, router, None, None, ctx).float(), dim=-1)
    weights, chosen = torch.topk(probs, TOP_K, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_in_hidden_dtype:
        weights = weights.to(x.dtype)
    pairs = flat.new_zeros(flat.shape[0], TOP_K, flat.shape[1])
    for e in range(EXPERTS):
        tokens, slot = torch.where(chosen == e)
        if tokens.numel() == 0:
            continue
        gate, up, down = expert(e)
        h = flat[tokens]
        y = linear(F.silu(linear(h, gate, None, None, ctx)) * linear(h, up, None, None, ctx), down, None, None, ctx)
        pairs.index_put_((tokens, slot), y)
    return (pairs * weights[..., None]).sum(dim=1).to(x.dtype).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize,in_hidden", [(True, False), (False, True)])
def test_routing_reads_the_device_once_and_gives_the_per_expert_loops_output(dtype, renormalize, in_hidden):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, HIDDEN, generator=gen).to(dtype)
    router = torch.randn(EXPERTS, HIDDEN, generator=gen).to(dtype)
    router[EXPERTS - 1] = -50.0 * x.reshape(-1, HIDDEN).float().mean(0).sign().to(dtype)  # an expert nobody picks
    weights = [tuple((torch.randn(*s, generator=gen) * 0.2).to(dtype) for s in
                     ((INNER, HIDDEN), (INNER, HIDDEN), (HIDDEN, INNER))) for _ in range(EXPERTS)]
    ctx = BlockContext(dtype=dtype, position_ids=torch.zeros(3, 7, dtype=torch.long), ropes={}, masks={}, params=None)
    with HostReads() as reads:
        ours = routed_experts(x, router, weights.__getitem__, EXPERTS, TOP_K, F.silu, ctx, renormalize=renormalize,
                              weights_in_hidden_dtype=in_hidden)
    assert reads.names == ["tolist"], reads.names  # the counts; nothing per expert
    with HostReads() as before:
        expected = _where_per_expert(x, router, weights.__getitem__, ctx, renormalize, in_hidden)
    assert before.count >= EXPERTS  # the counter sees the per-expert waits it replaced
    assert torch.equal(ours, expected)


def test_routing_backward_is_the_per_expert_loops_to_the_bit():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, HIDDEN, generator=gen)
    router = torch.randn(EXPERTS, HIDDEN, generator=gen)
    weights = [tuple(torch.randn(*s, generator=gen) * 0.2 for s in ((INNER, HIDDEN), (INNER, HIDDEN), (HIDDEN, INNER)))
               for _ in range(EXPERTS)]
    ctx = BlockContext(dtype=torch.float32, position_ids=torch.zeros(2, 5, dtype=torch.long), ropes={}, masks={},
                       params=None)
    grads = []
    for run in (lambda h: routed_experts(h, router, weights.__getitem__, EXPERTS, TOP_K, F.silu, ctx,
                                         renormalize=True, weights_in_hidden_dtype=False),
                lambda h: _where_per_expert(h, router, weights.__getitem__, ctx, True, False)):
        h = x.clone().requires_grad_(True)
        run(h).square().sum().backward()
        grads.append(h.grad)
    assert torch.equal(grads[0], grads[1])
