"""A settle whose all-reduce travels while the host works (one-rank groups: gloo, and NCCL on a GPU)."""

from __future__ import annotations

import pytest
import torch

from lema.app.parallel import distributed
from lema.app.parallel.rank_agreement import PendingSettle, is_agreed


@pytest.fixture
def gloo():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_the_sums_come_once_and_a_failure_is_raised_the_same_way_each_time(gloo):
    issued = []
    with distributed.observe_collectives(lambda name, blocking: issued.append((name, blocking))):
        assert PendingSettle(None, [7, 2.5]).result() == [7.0, 2.5]
        assert issued == [("all_reduce", False)]  # nothing waited where it was issued
        error = ValueError("bad row")
        pending = PendingSettle(error, [3])
        for _ in range(2):
            with pytest.raises(ValueError, match="bad row") as raised:
                pending.result()
            assert raised.value is error and is_agreed(error)
    # the failure's messages were gathered once, at the first result()
    assert issued == [("all_reduce", False), ("all_reduce", False), ("all_gather", True)]


@pytest.mark.cuda
def test_on_nccl_the_sums_are_read_without_waiting_for_the_queued_compute():
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        a = torch.randn(4096, 4096, device="cuda")
        pending = PendingSettle(None, [5, 1.5])
        for _ in range(20):  # compute queued after the all-reduce, on the current stream
            a = a @ a / 64
        done = torch.cuda.Event()
        done.record()
        assert pending.result() == [5.0, 1.5]
        assert not done.query()  # read while the matmuls still ran: the host did not wait for them
        torch.cuda.synchronize()
    finally:
        torch.distributed.destroy_process_group()
