"""The calibration's runs: timing a callable, and the toys the fixed costs are measured on.

:func:`_timed` (the median of runs within a budget: the rates, as ``lema bench`` reports its
median step) and :func:`_fastest` / :func:`_fastest_pair` (the fastest: a fixed cost is a
floor); one decoder layer and the head of a model on random weights (:func:`_layer_times`,
:func:`_head_time`); the fixed costs of a step on a toy of the model's own family
(:func:`overheads`, :func:`shrunk_spec`). Used by :mod:`lema.adapters.devices.calibrate`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from lema.domain.model.spec import ModelSpec
from lema.domain.plan.inputs import TrainingShape
from lema.domain.plan.items import ModelFacts
from lema.ports.device import Device

__all__ = ["overheads", "shrunk_spec"]


def _timed(fn: Callable[[], Any], sync: Callable[[], None], budget_s: float = 0.5) -> float:
    """Median seconds of ``fn``: one warm-up, then runs until ``budget_s`` is spent (at least
    one, at most 50): the typical run, as ``lema bench`` reports the median step it is compared
    with. A big model's layer takes one or two runs, so the calibration stays within seconds."""
    fn()
    sync()
    times: list[float] = []
    spent = 0.0
    while not times or (spent < budget_s and len(times) < 50):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


def _fastest(fn: Callable[[], Any], sync: Callable[[], None], budget_s: float = 0.3, runs: int = 7) -> float:
    """The fastest of at least ``runs`` runs of ``fn`` (more while ``budget_s`` lasts, at most
    200): a fixed cost is a floor, and on a busy machine a run that waited for a core says
    nothing of it (the median of a few such runs can be the wait)."""
    fn()
    sync()
    best, spent, count = float("inf"), 0.0, 0
    while count < runs or (spent < budget_s and count < 200):
        start = time.perf_counter()
        fn()
        sync()
        took = time.perf_counter() - start
        best, spent, count = min(best, took), spent + took, count + 1
    return best


def _fastest_pair(a: Callable[[], Any], b: Callable[[], Any], sync: Callable[[], None], budget_s: float = 0.6,
                  runs: int = 7) -> tuple[float, float]:
    """:func:`_fastest` of ``a`` and of ``b``, their runs taken in turn, so that a stretch of a
    busy machine slows both rather than one (their difference is what is wanted)."""
    for fn in (a, b):
        fn()
        sync()
    best = [float("inf"), float("inf")]
    spent, count = 0.0, 0
    while count < runs or (spent < budget_s and count < 200):
        for i, fn in enumerate((a, b)):
            start = time.perf_counter()
            fn()
            sync()
            took = time.perf_counter() - start
            best[i], spent = min(best[i], took), spent + took
        count += 1
    return best[0], best[1]


_SHRINK = {"hidden_size": 64, "n_embd": 64, "intermediate_size": 128, "n_inner": 128, "moe_intermediate_size": 32,
           "shared_expert_intermediate_size": 32, "head_dim": 16, "vocab_size": 256, "num_hidden_layers": 1,
           "n_layer": 1, "num_attention_heads": 4, "n_head": 4}


def shrunk_spec(spec: ModelSpec, layers: int = 1) -> ModelSpec | None:
    """The model's own family and options at toy sizes (hidden 64, 4 heads of 16, ``layers``
    layers, vocabulary 256; experts kept, each 32 wide): its ops cost only their fixed part, the
    Python and the launches, which is what :func:`overheads` measures. None when the family
    refuses the shrunk config (its fixed costs are then the device kind's defaults)."""
    config = spec.config
    small = {k: v for k, v in config.items() if k != "quantization_config"}
    for key, value in _SHRINK.items():
        if isinstance(small.get(key), int) and not isinstance(small.get(key), bool):
            small[key] = layers if key in ("num_hidden_layers", "n_layer") else value
    kv = config.get("num_key_value_heads")
    if isinstance(kv, int) and kv > 0:
        heads = config.get("num_attention_heads", kv)
        small["num_key_value_heads"] = 4 if kv >= heads else 2
    if isinstance(small.get("layer_types"), list) and small["layer_types"]:
        small["layer_types"] = (small["layer_types"] * layers)[:layers]
    try:
        return ModelSpec.from_config(small, dtype=spec.dtype)
    except Exception:  # noqa: BLE001 - a family with options the toy sizes break: no measurement
        return None


def _layer_times(spec: ModelSpec, shape: TrainingShape, batch: int, seq: int, dtype: torch.dtype, device: Device,
                 budgets: tuple[float, float] = (2.0, 3.0), floor: bool = False) -> tuple[float, float]:
    """Median seconds (``floor``: the fastest, :func:`_fastest`) of the first decoder layer of
    ``spec`` on random weights at ``(batch, seq)``: a forward without autograd (the
    checkpointed walk) and a forward with autograd + backward."""
    from lema.domain.model import blocks, context
    from lema.domain.model.lora import LoraSpec, module_keys, module_shape, resolve_targets

    unit = spec.units[1]
    where = device.torch_device
    generator = torch.Generator().manual_seed(0)
    weights = {t.key: (torch.randn(t.shape, generator=generator) * 0.02 + (1.0 if len(t.shape) == 1 else 0.0))
               .to(dtype).to(where) for t in unit.tensors}
    targets = resolve_targets(spec.family, shape.lora_targets)
    adapters = {}
    for key in module_keys(spec, targets):
        n_in, n_out = module_shape(spec, key)
        a = (torch.randn(shape.lora_rank, n_in, generator=generator) * 0.01).to(where).requires_grad_(True)
        b = (torch.randn(n_out, shape.lora_rank, generator=generator) * 0.01).to(where).requires_grad_(True)
        adapters[key] = (a, b)
    ctx = context.make_context(spec, (batch, seq), device=where, dtype=dtype,
                               lora=LoraSpec(rank=shape.lora_rank, targets=targets), training=True,
                               matmul_dtype=device.matmul_dtype(dtype))
    x = torch.randn(batch, seq, spec.hidden_size, generator=generator).to(dtype).to(where)
    grad = torch.randn_like(x)

    def forward() -> None:
        with torch.no_grad():
            blocks.decoder_block(spec, weights, adapters, x, ctx, 0)

    def forward_backward() -> None:
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = blocks.decoder_block(spec, weights, adapters, x_in, ctx, 0)
            torch.autograd.backward(out, grad)
        for pair in adapters.values():
            for t in pair:
                t.grad = None

    if floor:
        return _fastest_pair(forward, forward_backward, device.synchronize, budget_s=sum(budgets))
    return (_timed(forward, device.synchronize, budget_s=budgets[0]),
            _timed(forward_backward, device.synchronize, budget_s=budgets[1]))


def _head_time(spec: ModelSpec, shape: TrainingShape, batch: int, seq: int, dtype: torch.dtype, device: Device,
               budget: float = 2.0, floor: bool = False) -> float:
    """Median seconds (``floor``: the fastest) of the head's chunked fp32 loss + backward of
    ``spec`` on random weights."""
    from lema.domain.model import heads

    unit = spec.units[-1]
    where = device.torch_device
    generator = torch.Generator().manual_seed(1)
    weights = {t.key: (torch.randn(t.shape, generator=generator) * 0.02 + (1.0 if len(t.shape) == 1 else 0.0))
               .to(dtype).to(where) for t in unit.tensors}
    x = torch.randn(batch, seq, spec.hidden_size, generator=generator).to(dtype).to(where)
    targets = torch.randint(0, spec.vocab_size, (batch, seq), generator=generator).to(where)
    products = device.matmul_dtype(dtype)

    def loss_backward() -> None:
        x_last = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, _ = heads.head_loss(spec, weights, x_last, targets, shape.head_chunk_tokens, matmul_dtype=products)
            loss.backward()

    return (_fastest if floor else _timed)(loss_backward, device.synchronize, budget_s=budget)


def _tensor_overhead(count: int, device: Device) -> float:
    """Seconds per trainable tensor of an optimizer step as the trainer runs it (gradients in,
    clipping's norm, AdamW with torch's default implementation for the device, zeroing), over
    ``count`` tiny tensors: their arithmetic is nothing, their per-tensor ops are all."""
    where = device.torch_device
    count = max(8, min(count, 1024))
    params = [torch.zeros(4, 4, device=where, requires_grad=True) for _ in range(count)]
    grads = [torch.full((4, 4), 1e-3, device=where) for _ in range(count)]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _fastest(step, device.synchronize, budget_s=0.5) / count


def _step_overhead(spec: ModelSpec, f: ModelFacts, shape: TrainingShape, device: Device) -> float:
    """The step's own fixed parts outside the layers, the head and the optimizer: the engine's
    schedule for the plan's units (built every step), the embedding's gather and upload of a
    toy batch, and reading the loss back (a device wait and a host float)."""
    from lema.domain.schedule.layer_schedule import build_schedule

    where = device.torch_device
    n = f.n_layers
    units = list(range(1, n + 2))
    table = torch.randn(256, 64)
    ids = torch.randint(0, 256, (1, 8))
    loss = torch.zeros((), device=where)

    def parts() -> None:
        build_schedule(units, shape.prefetch, frozenset(), "train", frozenset(range(1, n + 1)))
        table[ids].to(where)
        float(loss)

    return _fastest(parts, device.synchronize, budget_s=0.3)


def overheads(spec: ModelSpec, f: ModelFacts, shape: TrainingShape, dtype: torch.dtype,
              device: Device) -> dict[str, float]:
    """The fixed costs of a step (:class:`~lema.domain.plan.timing.MachineRates` ``*_overhead_s``):
    a decoder layer's forward and backward and a head chunk of :func:`shrunk_spec` on 8 tokens
    (the toy's FLOPs and bytes are microseconds: the time is the ops' fixed part), the
    optimizer's per-tensor cost and the step's own parts, each the fastest of its runs
    (:func:`_fastest`). A model the toy cannot be made of
    keeps the layer and head terms at 0 here (the caller's defaults stand)."""
    from lema.domain.plan.timing import trainable_tensors

    out = {"tensor_overhead_s": _tensor_overhead(trainable_tensors(f), device),
           "step_overhead_s": _step_overhead(spec, f, shape, device)}
    small = shrunk_spec(spec)
    if small is not None and not small.units[1].packed:
        forward, forward_backward = _layer_times(small, shape, 1, 8, dtype, device, budgets=(0.3, 0.5), floor=True)
        out["layer_forward_overhead_s"] = forward
        out["layer_backward_overhead_s"] = max(forward_backward - forward, 0.0)
        out["head_overhead_s"] = _head_time(small, shape, 1, 8, dtype, device, budget=0.3, floor=True)
    return out
