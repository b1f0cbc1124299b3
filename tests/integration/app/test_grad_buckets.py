"""Gradient buckets: whole layers, last first, started during the backward, in order (one-rank gloo group)."""

from __future__ import annotations

import pytest
import torch

from lema.app.parallel.grad_buckets import GradientBuckets


@pytest.fixture
def group():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def chain(n_layers: int, width: int = 4) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(width, width, generator=gen).requires_grad_(), torch.randn(width, generator=gen).requires_grad_()]
            for _ in range(n_layers)]


def forward(layers: list[list[torch.Tensor]]) -> torch.Tensor:
    x = torch.ones(4)
    for w, b in layers:  # layer i feeds layer i + 1: the backward visits the last layer first
        x = torch.tanh(w @ x + b)
    return x.sum()


def test_buckets_hold_whole_layers_last_first(group):
    layers = chain(5)  # 80 bytes per layer
    assert GradientBuckets(layers, bucket_bytes=1).bucket_layers == [(4,), (3,), (2,), (1,), (0,)]
    assert GradientBuckets(layers, bucket_bytes=150).bucket_layers == [(4, 3), (2, 1), (0,)]
    assert GradientBuckets(layers).bucket_layers == [(4, 3, 2, 1, 0)]


def test_each_bucket_starts_while_the_earlier_layers_still_compute_and_sums_land_in_grad(group):
    layers = chain(4)
    pending = []  # at each launch: which layers had no gradient yet
    buckets = GradientBuckets(layers, bucket_bytes=1,
                              on_launch=lambda members: pending.append(
                                  (members, [i for i, (w, _) in enumerate(layers) if w.grad is None])))
    buckets.arm()
    forward(layers).backward()
    expected = {id(p): p.grad.clone() for layer in layers for p in layer}
    assert [m for m, _ in pending] == [(3,), (2,), (1,), (0,)]
    assert pending[0][1] == [0, 1, 2]  # layer 3's all-reduce started before layers 0..2 had gradients
    buckets.wait()
    assert all(torch.equal(p.grad, expected[id(p)]) for layer in layers for p in layer)  # one rank: the sum is itself
    buckets.close()


def test_unarmed_micro_steps_only_accumulate_and_finish_sends_zeros_for_missing_grads(group):
    layers = chain(2)
    launched = []
    buckets = GradientBuckets(layers, bucket_bytes=1, on_launch=launched.append)
    forward(layers).backward()  # not armed: an accumulating micro-step
    assert launched == []
    for p in layers[0]:
        p.grad = None
    buckets.arm()
    buckets.finish()  # e.g. a rank without rows this micro-step
    buckets.wait()
    assert launched == [(1,), (0,)]
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in layers[0])
    buckets.close()
