"""Whether this CPU multiplies in half precision more slowly than in fp32 (measured, once).

The CPU device computes the frozen weights' products in fp32 when it does
(:meth:`lema.adapters.devices.cpu.CpuDevice.matmul_dtype`).
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch

from lema.adapters.devices.allocation_counter import paused


@functools.lru_cache(maxsize=None)
def half_matmul_is_slow(dtype: torch.dtype) -> bool:
    """Time both orientations a linear layer needs, in ``dtype`` and in fp32 (a few ms).

    AVX2-only CPUs run bf16 products several times slower than fp32 (and ``grad @ W`` up
    to 100x slower); CPUs with AVX512-BF16/AMX run them faster. Measuring beats guessing
    from flags.
    """
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=gen), torch.randn(512, 256, generator=gen)
    g = torch.randn(64, 512, generator=gen)

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with paused():
        xh, wh, gh = x.to(dtype), w.to(dtype), g.to(dtype)
        half = best(lambda: (xh @ wh.t(), gh @ wh))
        wide = best(lambda: (xh.float() @ wh.float().t(), gh.float() @ wh.float()))
    return half > wide
