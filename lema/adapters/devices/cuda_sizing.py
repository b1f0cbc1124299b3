"""The CUDA device's sizes, as pure functions (tested on the CPU; the device calls them).

* :func:`cuda_capacity`: what LEMA may hold, from ``torch.cuda.mem_get_info`` at start (the
  CUDA context and other processes already out of it) and the user's budget;
* :func:`cuda_reserve`: what the runtime takes beyond LEMA's counted tensors once running:
  cuBLAS/cuBLASLt and attention workspaces per compute stream, the caching allocator's
  rounding and fragmentation, and NCCL's buffers when there are peers;
* :func:`reader_count`: the weight-reading threads for this machine's cores;
* :func:`pinned_bytes`: what a pinned host request really locks (PyTorch's caching host
  allocator rounds every request up to a power of two; exact sizes are registered instead).

Example:
    >>> cuda_reserve(ranks=1) // 2**20, cuda_reserve(ranks=2) // 2**20
    (192, 576)
    >>> pinned_bytes(404 * 10**6, exact=False) // 2**20, pinned_bytes(404 * 10**6) // 2**20
    (512, 385)
"""

from __future__ import annotations

__all__ = ["ALLOCATOR_SLACK", "NCCL_BUFFERS", "WORKSPACE_PER_STREAM", "cuda_capacity", "cuda_reserve",
           "pinned_bytes", "reader_count"]

MiB = 1 << 20
# cuBLAS (two 4 MiB workspaces + small ones per handle), cuBLASLt (up to 32 MiB on sm90) and
# the attention kernels' scratch, for the one stream that computes.
WORKSPACE_PER_STREAM = 64 * MiB
# The caching allocator's rounding (2 MiB blocks, 20 MiB segments) and the fragments it cannot
# reuse: a fixed floor, or this fraction of the memory in use, whichever is larger.
ALLOCATOR_SLACK = 128 * MiB
ALLOCATOR_SLACK_FRACTION = 0.02
# NCCL's communicator: NCCL_BUFFSIZE (4 MiB) send and receive buffers per channel and peer,
# up to 32 channels on NVLink, plus its own stream's workspace.
NCCL_BUFFERS = 384 * MiB


def cuda_reserve(ranks: int = 1, in_use: int = 0, compute_streams: int = 1) -> int:
    """Bytes the CUDA runtime takes beyond the tensors LEMA counts, once the context exists
    (the context itself is already out of :func:`cuda_capacity`).

    Args:
        ranks: processes in the run (NCCL's buffers when more than one).
        in_use: bytes LEMA will hold (the allocator's slack grows with them).
        compute_streams: streams that run cuBLAS / attention kernels.
    """
    slack = max(ALLOCATOR_SLACK, int(in_use * ALLOCATOR_SLACK_FRACTION))
    return compute_streams * WORKSPACE_PER_STREAM + slack + (NCCL_BUFFERS if ranks > 1 else 0)


def cuda_capacity(free: int, total: int, budget: int | None = None, held: int = 0) -> int:
    """The bytes LEMA may hold on a GPU: what was free when the device started (other
    processes and the CUDA context are out of it) plus what this process's allocator already
    holds, and no more than ``budget`` (or the card's ``total``)."""
    available = min(total, free + held)
    return available if budget is None else min(budget, available)


def reader_count(cpus: int, streams: int = 1, floor: int = 2, ceiling: int = 16) -> int:
    """Threads reading weights into staging buffers: one per core left after the compute's
    host thread and the prefetch thread, within ``[floor, ceiling]`` (a disk wants several
    requests in flight even on a small machine; more than 16 buys nothing)."""
    return max(floor, min(ceiling, cpus - 1 - streams))


def pinned_bytes(nbytes: int, exact: bool = True) -> int:
    """Host bytes locked by a pinned request of ``nbytes``: ``nbytes`` itself when registered
    exactly (``cudaHostRegister``, what :class:`~lema.adapters.devices.cuda.CudaDevice` does),
    else PyTorch's caching host allocator's next power of two."""
    if exact or nbytes <= 0:
        return max(0, nbytes)
    return 1 << (nbytes - 1).bit_length()
