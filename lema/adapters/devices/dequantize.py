"""Dequantize a streamed unit's packed weights on the device, after its upload.

The packed bytes cross the link as they are stored (a quarter of 16-bit weights for NF4);
right before a unit computes, :class:`UnitDequantizer` turns them into dense weights of the
compute dtype with bitsandbytes' kernels (a weight quantized from another dtype also gets,
for its backward product, the rounding bitsandbytes' backward uses: see
:func:`lema.adapters.weights.bnb.dequantize`), written into one scratch buffer allocated (and
counted) on the device once. Computes run one at a time, so one buffer the size of the
largest dequantized unit serves every slot and every resident unit; a unit computed twice
in a row from the same fetch (the last layer at the forward -> backward turn) is not
dequantized again.

Example:
    >>> states = read_quant_states(spec, source)                                   # doctest: +SKIP
    >>> dq = UnitDequantizer(spec, device, torch.bfloat16, states, units=[1, 2])   # doctest: +SKIP
    >>> dense = dq(1, slot_views, tag=(1, 0, 7))                                   # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Callable, Hashable, Mapping, Sequence

import torch

from lema.adapters.weights import bnb
from lema.domain.nn import quant
from lema.domain.nn.linear import SplitWeights
from lema.domain.model.spec import ModelSpec
from lema.ports.device import Device


class UnitDequantizer:
    """Dense views of a unit's weights, its packed ones dequantized into a device scratch buffer.

    Args:
        spec: the model (units with ``packed`` weights are dequantized, others pass through).
        device: where the scratch buffer is allocated (counted as ``"dequantized weights"``).
        dtype: the compute dtype the weights are dequantized to.
        states: every packed weight's constants (:func:`lema.adapters.weights.bnb.read_quant_states`).
        units: the unit indices that will compute (sizes the buffer).

    Raises:
        ConfigError: bitsandbytes is not installed (names the extra).
        DeviceOutOfMemory: the scratch buffer does not fit the device.
    """

    LABEL = "dequantized weights"

    def __init__(self, spec: ModelSpec, device: Device, dtype: torch.dtype,
                 states: Mapping[tuple[int, str], bnb.QuantState], units: Sequence[int]) -> None:
        if any(p.format.bits == 4 for u in units for p in spec.units[u].packed):
            bnb.functional()  # fail now, naming the extra, not in the middle of a step
        self.spec, self.device, self.dtype, self.states = spec, device, dtype, states
        itemsize = self._itemsize = torch.empty((), dtype=dtype).element_size()
        self._layouts = {u: quant.dense_layout(spec.units[u].packed, itemsize) for u in units if spec.units[u].packed}
        self._stored = {u: spec.units[u].stored_keys for u in self._layouts}
        self.nbytes = max((quant.dense_bytes(spec.units[u].packed, itemsize) for u in self._layouts), default=0)
        self._scratch = device.alloc(self.nbytes, self.LABEL) if self.nbytes else None
        dev = device.torch_device
        self._offsets = {k: torch.tensor(s.nested_offset, dtype=torch.float32, device=dev)
                         for k, s in states.items() if s.format.double_quant}
        # weights whose backward product bitsandbytes rounds otherwise (bnb.rounds_twice)
        self._twice = {u: tuple(p for p, _ in layout if bnb.rounds_twice(states[(u, p.key)], dtype))
                       for u, layout in self._layouts.items()}
        self._current: dict[int, Mapping[str, torch.Tensor]] = {}
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        self._holds: Hashable = None
        self.dequantized = 0  # units dequantized so far (tests, benchmarks)
        self.seconds = 0.0  # host time spent issuing dequantizations (on a CPU: doing them)

    def _dense_views(self, unit: int) -> dict[str, torch.Tensor]:
        views = self._views.get(unit)
        if views is None:
            assert self._scratch is not None
            views = self._views[unit] = {
                p.key: self._scratch[offset:offset + p.numel * self._itemsize].view(self.dtype).view(p.shape)
                for p, offset in self._layouts[unit]}
        return views

    def __call__(self, unit: int, weights: Mapping[str, torch.Tensor], tag: Hashable) -> Mapping[str, torch.Tensor]:
        """``weights`` with each packed weight replaced by its dense view (stored tensors dropped).

        Args:
            unit: the unit computing.
            weights: its stored tensors on the device (slot views or resident tensors).
            tag: identifies the bytes in ``weights`` (unit, slot, fetch); the same tag as the
                previous call reuses the scratch buffer as it is.
        """
        layout = self._layouts.get(unit)
        if layout is None:
            return weights
        dense = self._dense_views(unit)
        if tag is None or tag != self._holds:
            self._holds = None  # a failure below leaves the buffer holding nothing known
            start = time.perf_counter()
            for p, _ in layout:
                state = self.states[(unit, p.key)]
                bnb.dequantize(p, weights, state, self.dtype, out=dense[p.key], offset=self._offsets.get((unit, p.key)),
                               through_stored=bnb.forward_through_stored(state, self.dtype))
            self.seconds += time.perf_counter() - start
            self._holds = tag
            self.dequantized += 1
        stored = self._stored[unit]
        out = {k: v for k, v in weights.items() if k not in stored}
        out.update(dense)
        twice = self._twice[unit]
        if not twice:
            return out
        # The stored tensors of the unit's latest compute: a graph kept from the forward
        # (no checkpointing) runs its backward after the engine handed the unit again.
        self._current[unit] = weights
        return SplitWeights(out, {p.key: self._backward_weight(unit, p) for p in twice})

    def _backward_weight(self, unit: int, p: quant.PackedWeight) -> Callable[[], torch.Tensor]:
        """Makes ``p`` dequantized as bitsandbytes' backward does, from the unit's stored
        tensors as last handed in (its backward runs before its slot is released)."""
        state, offset = self.states[(unit, p.key)], self._offsets.get((unit, p.key))
        through = not bnb.forward_through_stored(state, self.dtype)  # the other rounding than the forward's
        return lambda: bnb.dequantize(p, self._current[unit], state, self.dtype, offset=offset,
                                      through_stored=through)

    def close(self) -> None:
        """Give the scratch buffer back to the device."""
        if self._scratch is not None:
            self.device.free(self._scratch)
            self._scratch = None
            self._views.clear()
            self._current.clear()
            self._holds = None
