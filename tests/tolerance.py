"""The suite's one tolerance rule: bounds come from measured noise, not from one CPU.

Two results computed in a different order differ by rounding, and by how much depends on
the machine: AVX512 and AVX2 kernels block their sums differently, the thread count
splits them differently, and a batch of one row takes other kernels than a batch of two.
A bound picked by looking at one CPU (``<= 1e-6`` because that CPU gave 9e-7) fails on
the next one. So every numerical comparison in the suite follows this rule:

1. **Same operations, same order: bit-identity.** ``torch.equal``, no tolerance (offload
   alone, resume, a power-of-two LoRA scaling, the late device...).
2. **Otherwise: ``MULTIPLE x noise``**, where ``noise`` is the larger of

   a. the **order noise**: the difference the *reference* shows against itself when only
      the summation order changes (:func:`order_noise`: the reference computed again on one
      thread instead of torch's current count, and, where the test can, on its batch split
      into single rows), measured in the test on the machine at hand; and
   b. the **rounding floor** of the dtype and the reduction length: ``depth * sqrt(n) * u``
      relative to the reference's scale (:func:`rounding_floor`), with ``u`` the dtype's
      unit roundoff, ``n`` the longest sum in the computation and ``depth`` the number of
      such sums chained one after the other (layers, optimizer steps). ``sqrt(n) * u`` is
      the usual size of the error of an ``n``-term sum (Higham and Mary, "A new approach
      to probabilistic rounding error analysis", 2019); the floor stands in where the
      reference happens to take the same order twice (a measured noise of 0).

   ``MULTIPLE`` is 16: measured over the whole suite on the default kernels, on
   ``ATEN_CPU_CAPABILITY=avx2`` and on one thread (docs/testing.md has the table), LEMA's
   difference from the reference never exceeded 2x the noise so defined, so 16 leaves a
   factor of 8 for a CPU we have not seen while staying orders of magnitude below what a
   real error gives (a wrong mask, a missing tile, a dropped LoRA term: 1e-3 and more).

Errors are measured the same way everywhere: ``||got - want|| / ||want||`` over the
compared entries (:func:`relative_error`). Set ``LEMA_TOLERANCE_LOG`` to
a file path and every comparison appends one JSON line (test, error, noise, floor, bound):
``python -m tests.tolerance_report`` turns such logs into the table in docs/testing.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch

MULTIPLE = 16.0

UNIT_ROUNDOFF = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.bfloat16: 2.0 ** -8,
    torch.float16: 2.0 ** -11,
}

Tensors = Union[torch.Tensor, Iterable[torch.Tensor], Mapping[str, torch.Tensor]]


def flat(values: Tensors) -> torch.Tensor:
    """One fp64 vector of a tensor, a sequence of tensors or a name -> tensor mapping
    (a mapping in the order of its sorted keys)."""
    if isinstance(values, torch.Tensor):
        return values.detach().double().flatten()
    if isinstance(values, Mapping):
        values = [values[k] for k in sorted(values)]
    return torch.cat([v.detach().double().flatten() for v in values])


def relative_error(got: Tensors, want: Tensors) -> float:
    """``||got - want|| / ||want||`` over every entry, in fp64 (0 when both are all zeros).

    Norm-wise, not element-wise: AdamW divides each gradient element by its own magnitude,
    so an element whose gradient is as small as its rounding moves by up to ``lr`` either
    way, whatever the summation order; a norm weighs it by its size. A real error (a wrong
    row, a dropped term) still shows: one wrong token's logits among a batch's move the
    norm by far more than rounding does.
    """
    a, b = flat(got), flat(want)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    scale = float(b.norm())
    diff = float((a - b).norm())
    return diff / scale if scale > 0 else diff


def rounding_floor(dtype: torch.dtype, n: int, depth: int = 1) -> float:
    """``depth * sqrt(n) * u``: the relative rounding of ``depth`` chained sums of ``n``
    terms each in ``dtype`` (see the module docstring)."""
    return depth * math.sqrt(max(n, 1)) * UNIT_ROUNDOFF[dtype]


def on_one_thread(compute: Callable[[], Any]) -> Any:
    """``compute()`` with torch's intra-op thread count set to 1 (then restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute()
    finally:
        torch.set_num_threads(threads)


def order_noise(reference: Callable[[], Tensors], *, split: Callable[[], Tensors] | None = None,
                baseline: Tensors | None = None) -> float:
    """The reference against itself with only the summation order changed.

    Runs ``reference()`` on one thread and (unless given as ``baseline``) on torch's current
    thread count, and ``split()`` when given (the same computation with the batch split
    into rows); returns the largest :func:`relative_error` of those against the baseline.
    Nothing else changes between the runs, so any difference is rounding.
    """
    want = reference() if baseline is None else baseline
    noise = relative_error(on_one_thread(reference), want)
    if split is not None:
        noise = max(noise, relative_error(split(), want))
    return noise


def logits_noise(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 select: torch.Tensor | None = None) -> float:
    """:func:`order_noise` of a transformers causal LM's logits: one thread, and the batch
    row by row (``select``: a boolean mask of the positions compared, e.g. the real tokens)."""

    def run(rows: slice = slice(None)) -> torch.Tensor:
        with torch.no_grad():
            mask = None if attention_mask is None else attention_mask[rows]
            return model(input_ids=input_ids[rows], attention_mask=mask).logits

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return logits if select is None else logits[select]

    def rows() -> torch.Tensor:
        return pick(torch.cat([run(slice(r, r + 1)) for r in range(input_ids.shape[0])]))

    return order_noise(lambda: pick(run()), split=rows if input_ids.shape[0] > 1 else None)


def forward_floor(config: Any, seq: int, extra: int = 0) -> float:
    """The rounding floor of a decoder's fp32 forward: its longest sum (hidden, MLP or
    sequence) chained once per layer, plus the embedding and the head (and ``extra`` more
    chained stages: optimizer steps, a loss). ``config``: a transformers config or a
    ``ModelSpec``."""
    get = (lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), 0))
    hidden = get("hidden_size", "n_embd")
    inner = get("intermediate_size", "n_inner") or 4 * hidden
    layers = get("num_hidden_layers", "n_layers", "n_layer")
    return rounding_floor(torch.float32, max(hidden, inner, seq), depth=layers + 2 + extra)


def bound(noise: float, floor: float) -> float:
    """``MULTIPLE * max(noise, floor)``: the rule's bound on a relative error."""
    return MULTIPLE * max(noise, floor)


def assert_close(got: Tensors, want: Tensors, *, floor: float, noise: float = 0.0, what: Any = "") -> float:
    """Assert ``relative_error(got, want) <= MULTIPLE * max(noise, floor)``; returns the error.

    ``floor`` is :func:`rounding_floor` for the computation compared, ``noise`` its
    :func:`order_noise` when the test measured one.
    """
    error = relative_error(got, want)
    limit = bound(noise, floor)
    _log(error, noise, floor, limit, what)
    assert error <= limit, (f"{what}: relative error {error:.3g} > {MULTIPLE:g} x max(order noise {noise:.3g}, "
                            f"rounding floor {floor:.3g}) = {limit:.3g}")
    return error


def _log(error: float, noise: float, floor: float, limit: float, what: Any) -> None:
    path = os.environ.get("LEMA_TOLERANCE_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    line = {"test": test, "what": str(what), "error": error, "noise": noise, "floor": floor, "bound": limit,
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
