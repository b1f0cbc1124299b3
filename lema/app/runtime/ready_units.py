"""Units a compute can use at once: no upload to wait for.

On a device whose memory is the host's (the CPU), the engine either reads a unit straight
into its slot or, training for real without a budget, computes on the source's own tensors
(the mapped file's pages, RESIDENT's RAM copy). Either way the "upload" is complete when
the read is: :data:`DONE` is its ticket. :func:`touched` faults a mapped unit's pages in on
the prefetch thread, so the compute does not.
"""

from __future__ import annotations

from typing import Mapping

import torch


def touched(views: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``views`` after reading one byte of each of their pages: a mapped file's pages are
    faulted in by the prefetch thread, not by the compute (a few microseconds once they are)."""
    for tensor in views.values():
        if tensor.numel():
            flat = tensor.detach().reshape(-1).view(torch.uint8).numpy()
            int(flat[::PAGE].sum())
    return dict(views)


PAGE = 4096


class Done:
    """The ticket of a read that is already complete (direct reads)."""

    def wait(self) -> None:
        return None

    def done(self) -> bool:
        return True


DONE = Done()
