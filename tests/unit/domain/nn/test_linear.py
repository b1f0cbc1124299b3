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
