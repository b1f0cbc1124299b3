"""DeviceTraits: what a device is, declared by the device and read by the engine, bootstrap and planner.

A :class:`~lema.ports.device.Device` carries one of these records (``device.traits``), so
no caller probes a device for optional attributes or compares its name: the engine picks
its weight path from ``in_place``, ``direct_reads`` and ``simulated_link``; the planner
counts the runtime reserve, the optimizer's temporaries, the dequantization path and the
pinned staging from the others. ``lema plan --device cuda|cpu`` plans for a kind it has no
device of: :data:`DEVICE_KINDS` holds the traits of each kind, which the adapters start from.

Example:
    >>> DEVICE_KINDS["cuda"].pinned_host, DEVICE_KINDS["cpu"].runtime_reserve
    (True, 0)
"""

from __future__ import annotations

import attrs

__all__ = ["CPU", "CUDA", "DEFAULT_CUDA_RESERVE", "DEVICE_KINDS", "DeviceTraits"]

# CUDA context + allocator slack, counted when no --reserve is given (measured: 400-500 MiB).
DEFAULT_CUDA_RESERVE = 512 * 1024**2


@attrs.frozen(kw_only=True)
class DeviceTraits:
    """What a device is (its capacity is the device's own ``capacity``).

    Attributes:
        kind: its name in messages and plans (``"cuda"``, ``"cpu"``); nothing branches on it.
        host_memory: its memory is the host's (the CPU): tensors made on the host are
            already on the device, and its cores run the compute (weights are read by one
            thread, not a pool).
        pinned_host: uploads and downloads run from page-locked host buffers on a copy
            stream, asynchronously with the compute (CUDA).
        runtime_reserve: bytes the runtime holds beyond the counted tensors (the CUDA
            context, the allocator's slack), planned when no reserve is given.
        foreach_optimizer: the optimizer step runs foreach kernels, one temporary copy of all
            the gradients (CUDA); otherwise two copies of the largest tensor.
        dequantizes_in_place: dequantization writes the scratch buffer in place (CUDA); on a
            CPU bitsandbytes returns the dense weight as a new tensor, then copied.
        in_place: computes on the weights where the source holds them (the CPU training for
            real): no slots, no copy per step.
        direct_reads: the source reads weights straight into the device's slots (its memory
            is host memory): no staging copy.
        counts_compute: the device's peak counts every storage the compute allocates.
        simulated_link: the link is simulated (``Device.carry`` passes its time for bytes
            already in a slot).
        default_link_bytes_per_s, default_link_pageable_bytes_per_s, default_half_flops_per_s,
        default_fp32_flops_per_s, default_attention_efficiency, default_memory_bytes_per_s:
            the stated rates a step time is predicted from when this machine was not
            calibrated (``lema plan --calibrate``; :func:`lema.domain.plan.timing.default_rates`).
            CUDA: a PCIe 4.0 x16 link (about 20 GB/s pinned, 8 GB/s pageable) and a 24 GiB
            consumer card (RTX 4090 class: about 150 TFLOP/s dense bf16 in practice, 40 fp32,
            900 GB/s of elementwise traffic). CPU: two cores with AVX-512 BF16 (about 300 GFLOP/s
            bf16, 150 fp32, memcpy and elementwise 8 GB/s).
        default_layer_overhead_s, default_tensor_overhead_s, default_step_overhead_s,
        default_unit_overhead_s: the stated fixed costs (:class:`lema.domain.plan.timing.MachineRates`
            ``*_overhead_s``): per decoder-layer forward and head chunk (a backward: twice
            that), per trainable tensor at the optimizer step, per step, per engine compute
            step. CPU: 1 ms, 40 us (one tensor at a time), 2 ms, 0.2 ms; CUDA: 2 ms
            (launch-bound Python), 15 us (multi-tensor kernels), 5 ms, 0.2 ms.
        async_compute: the host queues the device's work and runs ahead (CUDA): a pass's
            fixed cost (its Python and launches) hides behind the device's work, and only
            what exceeds that work adds to the step; on a CPU both run on the same cores and add.
        bf16: computes bfloat16 natively (CPUs; CUDA from compute capability 8.0): a float16
            model file trains in bfloat16 there (:mod:`lema.domain.model.precision`).
        spare_staging: one host staging buffer more than the slots, taken in turn, so the
            read of the next unit never waits for an upload still in flight (CUDA: the host
            runs ahead of the copy engine).
    """

    kind: str
    host_memory: bool = False
    pinned_host: bool = False
    runtime_reserve: int = 0
    foreach_optimizer: bool = False
    dequantizes_in_place: bool = False
    in_place: bool = False
    direct_reads: bool = False
    counts_compute: bool = True
    simulated_link: bool = False
    default_link_bytes_per_s: float = 8e9
    default_link_pageable_bytes_per_s: float = 8e9
    default_half_flops_per_s: float = 300e9
    default_fp32_flops_per_s: float = 150e9
    default_attention_efficiency: float = 0.5
    default_memory_bytes_per_s: float = 8e9
    default_layer_overhead_s: float = 1e-3
    default_tensor_overhead_s: float = 40e-6
    default_step_overhead_s: float = 2e-3
    default_unit_overhead_s: float = 2e-4
    async_compute: bool = False
    bf16: bool = True
    spare_staging: bool = False


CUDA = DeviceTraits(kind="cuda", pinned_host=True, runtime_reserve=DEFAULT_CUDA_RESERVE, foreach_optimizer=True,
                    dequantizes_in_place=True, default_link_bytes_per_s=20e9, default_link_pageable_bytes_per_s=8e9,
                    default_half_flops_per_s=150e12, default_fp32_flops_per_s=40e12,
                    default_memory_bytes_per_s=900e9, default_layer_overhead_s=2e-3,
                    default_tensor_overhead_s=15e-6, default_step_overhead_s=5e-3, async_compute=True,
                    spare_staging=True)
CPU = DeviceTraits(kind="cpu", host_memory=True)

DEVICE_KINDS: dict[str, DeviceTraits] = {t.kind: t for t in (CUDA, CPU)}
