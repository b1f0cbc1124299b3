"""Summing the adapters' gradients over the ranks, bucket by bucket, while the backward runs.

The backward visits the decoder layers last to first. A post-accumulate-grad hook on each
LoRA parameter counts the gradients that are ready; when a bucket (one or more whole
layers, last layers first, about ``bucket_bytes`` each) has all of its gradients, it is
flattened and its ``all_reduce`` starts asynchronously, so it travels while the earlier
layers still compute. Buckets start strictly in order, so every rank issues the same
collectives in the same sequence whatever the hooks' timing. :meth:`GradientBuckets.finish`
starts the buckets that did not start (a rank with no rows this micro-step, or one that
failed mid-backward, contributes zeros), and :meth:`GradientBuckets.wait` waits for all of
them and writes the sums back into ``.grad``.

A micro-step may also carry a few numbers in the last bucket (``arm(carry=n)``, then
``finish(values)``): the data-parallel trainer sends its failure flag and loss sum that way,
so that the sum it needs after the pass costs no collective of its own. The last bucket then
starts at :meth:`~GradientBuckets.finish`, after the pass, when those numbers are known.

Only the micro-step that ends an accumulation is armed: the earlier ones add into
``.grad`` locally, like DDP's ``no_sync``; the sum of the ranks' accumulated gradients is
the same.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lema.app.parallel import distributed
from lema.app.parallel.rank_agreement import peer_lost

DEFAULT_BUCKET_BYTES = 25 * 1024**2  # DDP's default bucket size


class GradientBuckets:
    """Bucketed, overlapped all-reduce (sum) of the LoRA gradients.

    Args:
        layers: the trainable tensors of each decoder layer, first layer first.
        bucket_bytes: close a bucket once it holds at least this many bytes (whole layers;
            1 makes one bucket per layer).
        on_launch: called with the bucket's layer indices when its all-reduce starts (the
            trainer records it in the device's timeline).
    """

    def __init__(self, layers: Sequence[Sequence[torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 on_launch: Callable[[tuple[int, ...]], None] | None = None) -> None:
        self.buckets: list[list[torch.Tensor]] = []
        self.bucket_layers: list[tuple[int, ...]] = []
        params: list[torch.Tensor] = []
        members: list[int] = []
        size = 0
        for index in reversed(range(len(layers))):
            params += list(layers[index])
            members.append(index)
            size += sum(p.numel() * p.element_size() for p in layers[index])
            if size >= bucket_bytes or index == 0:
                if params:
                    self.buckets.append(params)
                    self.bucket_layers.append(tuple(members))
                params, members, size = [], [], 0
        self._bucket_of = {id(p): k for k, bucket in enumerate(self.buckets) for p in bucket}
        self._on_launch = on_launch
        self._armed = False
        self._carry = 0
        self._carried: list[float] = []
        self._ready: list[set[int]] = []
        self._next = 0
        self._works: list[object] = []
        self._flat: list[torch.Tensor] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                         for bucket in self.buckets for p in bucket]

    def arm(self, carry: int = 0) -> None:
        """Sum this micro-step's gradients (the last one of an accumulation); with ``carry``,
        the last bucket also sums that many numbers, given to :meth:`finish`."""
        self._armed = True
        self._carry = carry
        self._carried = []
        self._ready = [set() for _ in self.buckets]
        self._next = 0
        self._works, self._flat = [], []

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._armed:
            return
        k = self._bucket_of[id(param)]
        self._ready[k].add(id(param))
        last = len(self.buckets) - (1 if self._carry else 0)  # a carrying last bucket waits for finish
        while self._next < last and len(self._ready[self._next]) == len(self.buckets[self._next]):
            self._launch()

    def _launch(self, extra: Sequence[float] = ()) -> None:
        k = self._next
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.buckets[k]]
        if extra:
            parts.append(torch.tensor(list(extra), dtype=parts[0].dtype, device=parts[0].device))
        flat = torch.cat(parts)
        try:
            work = distributed.all_reduce(flat, async_op=True)
        except Exception as exc:  # noqa: BLE001 - a peer that went away
            raise peer_lost(exc) from None
        self._works.append(work)
        self._flat.append(flat)
        self._next += 1
        if self._on_launch is not None:
            self._on_launch(self.bucket_layers[k])

    def finish(self, carried: Sequence[float] = ()) -> None:
        """Start every bucket that has not started (missing gradients count as zeros); the
        last one with ``carried``, the ``carry`` numbers that :meth:`arm` announced."""
        if self._armed:
            if len(carried) != self._carry:
                raise ValueError(f"finish: the buckets were armed to carry {self._carry} numbers, got {len(carried)}")
            while self._next < len(self.buckets):
                self._launch(carried if self._next == len(self.buckets) - 1 else ())

    def wait(self) -> list[float]:
        """Wait for every bucket and put the sums into the parameters' ``.grad``. Returns
        the sums of the carried numbers (empty when none were carried)."""
        if not self._armed:
            return []
        if self._next < len(self.buckets):
            self.finish([0.0] * self._carry)
        self._armed = False
        carry, self._carry = self._carry, 0
        works, flats = self._works, self._flat
        self._works, self._flat = [], []
        for k, (work, flat) in enumerate(zip(works, flats)):
            try:
                work.wait()  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                raise peer_lost(exc) from None
            offset = 0
            for p in self.buckets[k]:
                view = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
        return flats[-1][-carry:].tolist() if carry and flats else []

    def disarm(self) -> None:
        """Forget an armed micro-step that ended before its buckets (every rank raised)."""
        self._armed, self._carry = False, 0

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False
