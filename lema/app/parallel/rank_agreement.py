"""Ranks agree on failures: an error on one rank stops every rank, with one message and no hang.

Every rank must call the same collectives in the same order, so a rank that fails cannot
just leave: the others would wait for it. Each collective phase of a data-parallel run
(a micro-step, an evaluation, a checkpoint) therefore begins and ends with :func:`settle`,
one small all-reduce of ``[failed, values...]`` (always :data:`SLOTS` numbers, so any two
settles match). When a rank failed, every rank gathers the failures' messages and raises:
the failing rank its own error, the others :class:`~lema.errors.RankFailedError` naming
it. A rank that fails outside a phase (the CLI's setup, its loop) settles on its way out
(:func:`settle_on_exit`) and meets the others at their next settle.

Exceptions raised this way are marked *agreed* (every rank raised one); on ranks other than
0 they are also marked *reported elsewhere*: rank 0 prints the one message.

Example:
    >>> error = None                                  # doctest: +SKIP
    >>> try:
    ...     tokens = count_my_tokens()
    ... except Exception as exc:
    ...     error, tokens = exc, 0
    >>> (total,) = settle(error, [tokens])            # raises on every rank if any failed
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lema.app.parallel import distributed
from lema.errors import LemaError, RankFailedError

SLOTS = 4
MESSAGE_BYTES = 2048


def settle(error: Exception | None = None, values: Sequence[float] = ()) -> list[float]:
    """Every rank calls this at the same point: sum ``values`` over the ranks, or raise on
    every rank when one of them passes an ``error``.

    Args:
        error: this rank's failure since the last settle, or None.
        values: up to ``SLOTS - 1`` numbers to sum over the ranks (float64: integers up to
            2**53 stay exact).

    Returns:
        The sums, one per value.

    Raises:
        ``error`` itself on the rank that failed; :class:`RankFailedError` on the others.
    """
    sums = _all_reduce(_slots(error, values))
    return agree(error, sums[0], sums[1:1 + len(values)])


def agree(error: Exception | None, failed: float, sums: list[float]) -> list[float]:
    """What :func:`settle` does once the ranks' failure flags are summed (``failed``): return
    ``sums`` when no rank failed, else gather the messages and raise on every rank. Every
    rank must call it with the same ``failed`` (a sum from one collective)."""
    if failed == 0:
        return sums
    failures = [(rank, text) for rank, text in enumerate(_gather(describe(error) if error is not None else ""))
                if text]
    ranks = distributed.current()
    if error is None:
        first, text = failures[0]
        others = [str(rank) for rank, _ in failures[1:]]
        error = RankFailedError(f"rank {first} of {ranks.world} failed: {text}"
                                + (f" (ranks {', '.join(others)} failed too)" if others else ""))
    raise mark(error, reported_elsewhere=not ranks.is_main, together=True)


class PendingSettle:
    """A :func:`settle` whose all-reduce travels while the host does other work (the
    forward): :meth:`result` waits for it where its sums are first needed.

    It has the shape of :func:`settle` (a rank that meets it with :func:`settle_on_exit`
    matches it). Between issuing it and :meth:`result`, a rank may issue no other collective
    (a failure found by :meth:`result` gathers the messages, on every rank)."""

    def __init__(self, error: Exception | None, values: Sequence[float]) -> None:
        self._error, self._count = error, len(values)
        self._tensor = torch.tensor(_slots(error, values), dtype=torch.float64, device=distributed.comm_device())
        try:
            self._work = distributed.all_reduce(self._tensor, async_op=True)
        except Exception as exc:  # noqa: BLE001
            raise peer_lost(exc) from None
        self._host: torch.Tensor | None = None
        self._ready: Any = None
        if self._tensor.is_cuda:
            # NCCL: read the sums through a side stream, so reading them waits for this
            # all-reduce only, not for the compute queued on the current stream meanwhile.
            stream = torch.cuda.Stream(device=self._tensor.device)
            with torch.cuda.stream(stream):
                self._work.wait()
                self._host = torch.empty(SLOTS, dtype=torch.float64, pin_memory=True)
                self._host.copy_(self._tensor, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record(stream)
        self._outcome: list[float] | Exception | None = None

    def result(self) -> list[float]:
        """The sums, as :func:`settle` returns them (the same raise on every rank when one
        failed; asked again, the same answer without another collective)."""
        if self._outcome is None:
            try:
                self._outcome = agree(self._error, *self._sums())
            except Exception as exc:  # noqa: BLE001 - kept, raised again to a second caller
                self._outcome = exc
        if isinstance(self._outcome, Exception):
            raise self._outcome
        return self._outcome

    def _sums(self) -> tuple[float, list[float]]:
        try:
            if self._ready is not None:
                self._ready.synchronize()
                sums = self._host.tolist()  # type: ignore[union-attr]
            else:
                self._work.wait()
                sums = self._tensor.tolist()
        except Exception as exc:  # noqa: BLE001
            raise peer_lost(exc) from None
        return sums[0], sums[1:1 + self._count]


def settle_on_exit(error: Exception) -> Exception:
    """Meet the other ranks at their next :func:`settle` with ``error``, which is about to end
    this rank, so that they stop too. Returns the exception to report here (``error``
    itself, marked, or the agreed one); ``error`` unchanged when data parallel is off or
    the ranks already agreed on it."""
    if not distributed.active() or is_agreed(error):
        return error
    try:
        settle(error)
    except Exception as agreed:  # noqa: BLE001 - settle raises the agreed error on purpose
        return agreed
    return error


def farewell() -> None:
    """A last collective before the ranks exit together, so that rank 0 has printed first
    (torchrun stops every rank as soon as one has exited). Errors are ignored: a rank that
    already went away is no reason to fail louder."""
    if not distributed.active():
        return
    try:
        _all_reduce([0.0] * SLOTS)
    except Exception:  # noqa: BLE001, S110
        pass


def describe(error: BaseException) -> str:
    """One line for another rank to print: LEMA's own message, else the type and message."""
    text = str(error) if isinstance(error, LemaError) else f"{type(error).__name__}: {error}"
    return text.strip() or type(error).__name__


def is_agreed(error: BaseException) -> bool:
    """Every rank raised an error together with this one (no need to settle again)."""
    return bool(getattr(error, "_lema_agreed", False))


def reported_elsewhere(error: BaseException) -> bool:
    """Rank 0 reports this failure: this rank should exit without printing it."""
    return bool(getattr(error, "_lema_reported_elsewhere", False))


def stopping_together(error: BaseException) -> bool:
    """Every rank raised this error at one settle and is alive to exit with the others."""
    return bool(getattr(error, "_lema_together", False))


def mark(error: Exception, *, reported_elsewhere: bool, together: bool) -> Exception:
    """Mark ``error`` as agreed (and, off rank 0, as reported by rank 0)."""
    try:
        error._lema_agreed = True  # type: ignore[attr-defined]
        error._lema_reported_elsewhere = reported_elsewhere  # type: ignore[attr-defined]
        error._lema_together = together  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without a __dict__: report it here
        pass
    return error


def peer_lost(cause: BaseException) -> Exception:
    """The error for a collective that failed because another rank's process went away."""
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    error = RankFailedError(f"another rank of the run stopped while this one waited for it ({first}); "
                            "its own output says why")
    return mark(error, reported_elsewhere=not distributed.current().is_main, together=False)


def _slots(error: Exception | None, values: Sequence[float]) -> list[float]:
    if len(values) > SLOTS - 1:
        raise ValueError(f"settle: at most {SLOTS - 1} values, got {len(values)}")
    padded = [1.0 if error is not None else 0.0, *map(float, values)]
    return padded + [0.0] * (SLOTS - len(padded))


def _all_reduce(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=distributed.comm_device())
    try:
        distributed.all_reduce(tensor)
    except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
        raise peer_lost(exc) from None
    return tensor.tolist()


def _gather(text: str) -> list[str]:
    data = text.encode("utf-8")[:MESSAGE_BYTES]
    device = distributed.comm_device()
    mine = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    out = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    try:
        distributed.all_gather(out, mine)
    except Exception as exc:  # noqa: BLE001
        raise peer_lost(exc) from None
    return [bytes(t.cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace") for t in out]
