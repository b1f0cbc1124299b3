"""The LoRA update of :func:`lema.domain.nn.linear.linear` in PEFT's order of operations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lema.domain.nn.context import BlockContext
from lema.domain.nn.linear import linear


def _ctx(scaling: float, dtype: torch.dtype) -> BlockContext:
    return BlockContext(dtype=dtype, position_ids=torch.zeros(1, 1, dtype=torch.long), ropes={}, masks={},
                        params=None, lora_scaling=scaling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [2.0, 0.5, 1.0, 0.75, 16 / 8 ** 0.5])
def test_the_lora_update_is_peft_s_to_the_bit(scaling, dtype):
    # PEFT: result + lora_B(lora_A(x)) * scaling, x cast to the adapter's fp32, the sum cast back.
    # A power-of-two scaling is applied to the rank-r product instead: the same bits, less work.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 96, generator=gen).to(dtype)
    w = (torch.randn(80, 96, generator=gen) * 0.1).to(dtype)
    a, b = torch.randn(8, 96, generator=gen) * 0.1, torch.randn(80, 8, generator=gen) * 0.1
    base = F.linear(x, w)
    expected = (base + F.linear(F.linear(x.to(torch.float32), a), b) * scaling).to(dtype)
    assert torch.equal(linear(x, w, None, (a, b), _ctx(scaling, dtype)), expected)


def test_the_lora_gradients_are_peft_s_to_the_bit():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 50, 64, generator=gen), torch.randn(72, 64, generator=gen) * 0.1
    grad = torch.randn(4, 50, 72, generator=gen)
    grads = []
    for ours in (True, False):
        a = (torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 0.1).requires_grad_(True)
        b = (torch.randn(72, 16, generator=torch.Generator().manual_seed(3)) * 0.1).requires_grad_(True)
        out = linear(x, w, None, (a, b), _ctx(2.0, torch.float32)) if ours else \
            F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0
        out.backward(grad)
        grads.append((a.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _autograd_update(x, w, a, b, scaling):
    """PEFT's formulation through autograd (the rank-r product scaled when exact, as LEMA does)."""
    xa = x.to(a.dtype)
    if scaling in (2.0, 0.5, 1.0):
        delta = F.linear(F.linear(xa, a) * scaling, b)
    else:
        delta = F.linear(F.linear(xa, a), b) * scaling
    return (F.linear(x, w) + delta).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [2.0, 0.75])
def test_the_written_out_backward_is_autograd_s_to_the_bit(dtype, scaling):
    # lora_update's backward skips the bf16 -> fp32 -> bf16 round trip of the base output's
    # gradient and the fp32 sum; every value it returns is the one autograd computes.
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 33, 64, generator=gen).to(dtype)
    w = (torch.randn(72, 64, generator=gen) * 0.1).to(dtype)
    grad = torch.randn(2, 33, 72, generator=gen).to(dtype)
    results = []
    for ours in (True, False):
        x = x0.clone().requires_grad_(True)
        a = (torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 0.1).requires_grad_(True)
        b = (torch.randn(72, 16, generator=torch.Generator().manual_seed(3)) * 0.1).requires_grad_(True)
        out = linear(x, w, None, (a, b), _ctx(scaling, dtype)) if ours else _autograd_update(x, w, a, b, scaling)
        out.backward(grad)
        results.append((out.detach(), x.grad, a.grad, b.grad))
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_the_update_skips_the_input_gradient_nobody_asked_for():
    # Layer 0's input (the frozen embedding's rows) needs no gradient: neither product runs.
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 9, 32, generator=gen), torch.randn(24, 32, generator=gen)
    a = torch.randn(4, 32, generator=gen).requires_grad_(True)
    b = torch.randn(24, 4, generator=gen).requires_grad_(True)
    out = linear(x, w, None, (a, b), _ctx(2.0, torch.float32))
    out.sum().backward()
    assert a.grad is not None and b.grad is not None and not x.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modules_sharing_an_input_stack_their_a_products_and_equal_peft_s(dtype):
    # q, k and v (of different widths, as with grouped-query attention) through Projector.many
    # against PEFT's three modules one by one: the outputs and every gradient agree within
    # the tolerance rule (one product of K = 3r replaces three of K = r in the input gradient).
    from lema.domain.nn.linear import projector
    from tests.tolerance import assert_close, order_noise, rounding_floor

    gen = torch.Generator().manual_seed(6)
    keys = ("q", "k", "v")
    widths = {"q": 64, "k": 32, "v": 32}
    x0 = torch.randn(2, 40, 48, generator=gen).to(dtype)
    weights = {f"{k}.weight": (torch.randn(widths[k], 48, generator=gen) * 0.1).to(dtype) for k in keys}
    a0 = {k: torch.randn(8, 48, generator=gen) * 0.1 for k in keys}
    b0 = {k: torch.randn(widths[k], 8, generator=gen) * 0.1 for k in keys}
    grads = {k: torch.randn(2, 40, widths[k], generator=gen).to(dtype) for k in keys}

    def run(ours: bool, rows: slice | None = None):
        x = (x0 if rows is None else x0[rows]).clone().requires_grad_(True)
        adapters = {k: (a0[k].clone().requires_grad_(True), b0[k].clone().requires_grad_(True)) for k in keys}
        if ours:
            outs = projector(weights, adapters, _ctx(2.0, dtype), 0, keys).many(x, keys)
        else:
            outs = [_autograd_update(x, weights[f"{k}.weight"], *adapters[k], 2.0) for k in keys]
        torch.autograd.backward(outs, [grads[k] if rows is None else grads[k][rows] for k in keys])
        return [o.detach() for o in outs] + [x.grad] + [t.grad for k in keys for t in adapters[k]]

    ours, theirs = run(True), run(False)
    noise = order_noise(lambda: run(False)[:4], split=lambda: [torch.cat(p) for p in zip(
        run(False, slice(0, 1)), run(False, slice(1, 2)))][:4])
    assert_close(ours[:4], theirs[:4], floor=rounding_floor(dtype, 48 + 3 * 8), noise=noise,
                 what="outputs and the input gradient")
    for got, want in zip(ours[4:], theirs[4:]):
        assert_close(got, want, floor=rounding_floor(torch.float32, 80), what="adapter gradients")
