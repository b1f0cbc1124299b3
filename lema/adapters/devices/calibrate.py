"""``lema plan --calibrate``: measure this machine's rates for the step-time model, and cache them.

Measures, on a device (:class:`~lema.ports.device.Device`), in a few seconds:

* the link, host -> device, from page-locked and from ordinary memory (``Device.measure_link``);
* matmul throughput at the run's dtype and shapes: ``(T, in) @ (in, out)`` for each distinct
  projection of a decoder layer and the head's chunk, ``T`` the run's tokens (at most 4096);
  the products at the dtype the device really uses for them (``Device.matmul_dtype``);
* fused causal attention (``scaled_dot_product_attention``) at the run's ``(b, H, s, d)``
  (``s`` at most 4096), counted as ``2 b s^2 q`` FLOPs as the model counts it;
* elementwise traffic: one decoder layer of the model itself, on random weights at the run's
  shapes, forward and forward + backward; what the matmul and attention rates do not explain
  of its time is the elementwise traffic the model counts (an add and a SiLU over a
  ``(T, ffn)`` tensor when the layer cannot be built here: a quantized one), and the same for
  the head's chunked fp32 loss + backward (its own rate: its traffic is of another kind);
* the fixed costs no FLOP or byte count explains (:func:`overheads`): a decoder layer's
  forward and backward and a head chunk of the model's own family at toy sizes, the
  optimizer's cost per trainable tensor, the step's own parts (the engine's schedule, the
  embedding's gather, the loss read); the elementwise rates above are fitted to what is left
  once these are taken out.

The result is a :class:`~lema.domain.plan.timing.MachineRates`, cached as JSON under
``$LEMA_CACHE`` (default ``~/.cache/lema``) ``/calibration/<machine>-<device>.json``, one
entry per run key (dtype and shapes), written atomically. ``lema plan`` without
``--calibrate`` uses a cached entry of the same key when one exists, else the device
kind's stated defaults (and says so).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from lema.adapters.devices.calibration_cache import cache_path, cached_rates, device_name, rates_for, run_key
from lema.adapters.devices.calibration_cache import store as store_rates
from lema.adapters.devices.calibration_runs import _head_time, _layer_times, _timed, overheads, shrunk_spec
from lema.domain.model.spec import ModelSpec, torch_dtype
from lema.domain.plan.inputs import TrainingShape
from lema.domain.plan.items import ModelFacts
from lema.domain.plan.timing import MachineRates
from lema.ports.device import Device

__all__ = ["cache_path", "calibrate", "cached_rates", "device_name", "overheads", "rates_for", "run_key", "shrunk_spec"]

MAX_TOKENS = 4096
MAX_SEQ = 4096
MAX_PRODUCT_FLOPS = 2e10  # the largest product timed: under a second on a CPU, well above saturation


def _matmul_rate(f: ModelFacts, tokens: int, dtype: torch.dtype, where: torch.device, sync: Callable[[], None],
                 chunk: int) -> float:
    h = f.hidden
    shapes = {(tokens, h, f.q_dim), (tokens, h, f.kv_dim), (tokens, f.q_dim, h)}
    if f.ffn:
        shapes |= {(tokens, h, f.ffn), (tokens, f.ffn, h)}
    shapes.add((min(chunk, tokens), h, f.vocab))
    flops = seconds = 0.0
    for t, i, o in sorted(shapes):
        t = max(64, min(t, int(MAX_PRODUCT_FLOPS // (2 * i * o))))  # a big product's rate is reached sooner
        x = torch.randn(t, i, device=where).to(dtype)
        w = torch.randn(o, i, device=where).to(dtype)
        seconds += _timed(lambda: x @ w.t(), sync)
        flops += 2.0 * t * i * o
    return flops / seconds


def _attention_rate(f: ModelFacts, batch: int, seq: int, dtype: torch.dtype, where: torch.device,
                    sync: Callable[[], None]) -> float:
    import torch.nn.functional as F

    s = min(seq, MAX_SEQ)
    d = f.head_dim or f.q_dim // max(f.n_heads, 1)
    heads = max(f.n_heads, 1)
    q = torch.randn(batch, heads, s, d, device=where).to(dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    seconds = _timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), sync)
    return 2.0 * batch * s * s * heads * d / seconds


def _memory_rate(f: ModelFacts, tokens: int, dtype: torch.dtype, where: torch.device,
                 sync: Callable[[], None]) -> float:
    n = max(1, min(tokens * max(f.ffn, f.hidden), 64 << 20))
    x = torch.randn(n, device=where).to(dtype)
    y = torch.randn(n, device=where).to(dtype)
    out = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    add = _timed(lambda: torch.add(x, y, out=out), sync)
    silu = _timed(lambda: torch.nn.functional.silu(x), sync)
    return (3 * nbytes + 2 * nbytes) / (add + silu)


def _layer_memory_rate(spec: ModelSpec, f: ModelFacts, shape: TrainingShape, dtype: torch.dtype,
                       device: Device, matmul: float, attention: float,
                       fixed: dict[str, float] | None = None) -> float | None:
    """The elementwise rate one real decoder layer of this model shows at the run's shapes.

    Runs :func:`lema.domain.model.blocks.decoder_block` on random weights of the first decoder
    layer's shapes: a forward without autograd (the checkpointed walk) and a forward with
    autograd + backward (a kept layer's), on ``min(batch, ...)`` rows whose tokens are at most
    :data:`MAX_TOKENS`. What the matmul and attention rates do not explain of that time is the
    elementwise traffic the model counts (:func:`lema.domain.plan.timing.layer_work`): its rate
    is that traffic over that time, so the layer's own norms, casts, rotary and LoRA copies are
    measured, not guessed. None for a quantized layer (the dequantization path is not built here).
    """
    from lema.domain.plan.timing import layer_work

    if spec.units[1].packed:
        return None
    batch = max(1, min(shape.batch, MAX_TOKENS // max(shape.seq, 1)))
    seq = min(shape.seq, MAX_TOKENS)
    forward, forward_backward = _layer_times(spec, shape, batch, seq, dtype, device)
    measured = forward + forward_backward
    if fixed is not None and "layer_forward_overhead_s" in fixed:
        # A fixed cost is part of the real layer's time: a toy measured slower than the real
        # layer waited for a busy core, so it is capped at what the real layer took.
        fixed["layer_forward_overhead_s"] = min(fixed["layer_forward_overhead_s"], forward)
        fixed["layer_backward_overhead_s"] = min(fixed["layer_backward_overhead_s"], forward_backward)
    overhead = 0.0 if fixed is None else (2 * fixed.get("layer_forward_overhead_s", 0.0)
                                          + fixed.get("layer_backward_overhead_s", 0.0))
    fwd, bwd = layer_work(f, batch, seq, shape.lora_rank, shape.attention_path)
    explained = (2 * fwd.matmul + bwd.matmul) / matmul + (2 * fwd.attention + bwd.attention) / attention + overhead
    traffic = 2 * fwd.memory + bwd.memory
    return traffic / max(measured - explained, 0.05 * measured)


def _head_memory_rate(spec: ModelSpec, f: ModelFacts, shape: TrainingShape, dtype: torch.dtype,
                      device: Device, matmul: float, fixed: dict[str, float] | None = None) -> float | None:
    """The elementwise rate of the head's chunked fp32 loss + backward at the run's shape,
    measured like :func:`_layer_memory_rate` on random weights of the head's shapes (None for
    a packed head); the measured fixed cost per chunk (``fixed["head_overhead_s"]``, capped at
    what a chunk of the real head took) is not traffic."""
    from lema.domain.plan.timing import head_work

    if spec.units[-1].packed:
        return None
    batch = max(1, min(shape.batch, MAX_TOKENS // max(shape.seq, 1)))
    seq = min(shape.seq, MAX_TOKENS)
    measured = _head_time(spec, shape, batch, seq, dtype, device)
    work = head_work(f, batch, seq, True)
    chunks = -(-batch * seq // shape.head_chunk_tokens)
    fixed_per_chunk = 0.0
    if fixed is not None and "head_overhead_s" in fixed:  # a disturbed toy: capped, as for the layer
        fixed_per_chunk = fixed["head_overhead_s"] = min(fixed["head_overhead_s"], measured / chunks)
    return work.memory / max(measured - work.matmul / matmul - chunks * fixed_per_chunk, 0.05 * measured)


def calibrate(device: Device, device_name: str, f: ModelFacts, dtype: str, batch: int, seq: int,
              chunk: int = 1024, store: bool = True, spec: ModelSpec | None = None,
              shape: TrainingShape | None = None,
              engine: Callable[[ModelSpec, TrainingShape, Device], tuple[float, float] | None] | None = None,
              ) -> tuple[MachineRates, Path | None]:
    """Measure the rates (see the module docstring); cache them unless ``store`` is False.

    ``engine`` measures the engine's own fixed costs on ``device`` (the application's
    :func:`lema.app.tools.engine_overhead.engine_overhead`, which this layer may not import):
    ``(seconds per compute step, seconds per pass)``, added to ``unit_overhead_s`` and
    ``step_overhead_s``; None (or a model it cannot shrink): the engine's part is not measured.

    Returns:
        ``(rates, cache file or None)``.
    """
    where = device.torch_device
    want = torch_dtype(dtype)
    products = device.matmul_dtype(want) or want
    sync = device.synchronize
    tokens = min(batch * seq, MAX_TOKENS)
    with torch.no_grad():
        pinned, pageable = device.measure_link()  # type: ignore[attr-defined]
        matmul = _matmul_rate(f, tokens, products, where, sync, chunk)
        attention = _attention_rate(f, batch, min(seq, MAX_SEQ), want, where, sync)
        memory = _memory_rate(f, tokens, want, where, sync)
    head = None
    fixed: dict[str, float] = {}
    if spec is not None and shape is not None:
        fixed = overheads(spec, f, shape, want, device)
        layer = _layer_memory_rate(spec, f, shape, want, device, matmul, attention, fixed)
        memory = layer if layer is not None else memory
        head = _head_memory_rate(spec, f, shape, want, device, matmul, fixed)
        measured = engine(spec, shape, device) if engine is not None else None
        if measured is not None:
            fixed["unit_overhead_s"] = measured[0]
            fixed["step_overhead_s"] = fixed.get("step_overhead_s", 0.0) + measured[1]
    rates = MachineRates(link_bytes_per_s=pinned, link_pageable_bytes_per_s=pageable, matmul_flops_per_s=matmul,
                         attention_flops_per_s=attention, memory_bytes_per_s=memory,
                         head_memory_bytes_per_s=head, **fixed,
                         source=f"calibrated on {device_name} at {time.strftime('%Y-%m-%d %H:%M')}",
                         calibrated=True)
    path = store_rates(device_name, run_key(f, dtype, batch, seq), rates) if store else None
    return rates, path
