"""Several data sets in one run, mixed in stated proportions.

With weights ``w_i`` the mix holds ``N * w_i / sum(w)`` examples of data set ``i`` (``N``:
the examples of all the sets together, so the run's length stays that of the sets read
once): a set whose share is larger than its size is repeated whole, then topped up with a
seeded sample of its examples; a smaller share is a seeded sample.

Example:
    >>> mixed = mix([a, b], weights=(0.7, 0.3), seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import random
from typing import Sequence

from lema.data.store import StoreBuilder, TokenStore
from lema.errors import DataError


def parse_weights(text: str | None, n: int, option: str = "--data-weights") -> tuple[float, ...] | None:
    """``"0.7,0.3"`` -> weights, one per data set (None: no weights given)."""
    if text is None or not str(text).strip():
        return None
    try:
        weights = tuple(float(w) for w in str(text).split(","))
    except ValueError:
        raise DataError(f"{option}: {text!r} must be numbers separated by commas, e.g. 0.7,0.3") from None
    if len(weights) != n:
        raise DataError(f"{option}: {len(weights)} weights for {n} data sets; give one per --data")
    if any(not (w >= 0 and w < float("inf")) for w in weights) or not sum(weights) > 0:
        raise DataError(f"{option}: {text!r}: weights must be finite, >= 0, and not all 0")
    return weights


def counts(sizes: Sequence[int], weights: Sequence[float] | None,
           epochs: Sequence[float] | None = None) -> list[int]:
    """How many examples of each set the mix holds: by share (``weights``), by passes over
    each set (``epochs``: 2 is every example twice, 0.5 a seeded half), or all of each once."""
    if epochs is not None:
        return [round(n * e) for n, e in zip(sizes, epochs)]
    if weights is None:
        return list(sizes)
    total, wsum = sum(sizes), sum(weights)
    return [round(total * w / wsum) for w in weights]


def mix(stores: Sequence[TokenStore], weights: Sequence[float] | None, seed: int,
        epochs: Sequence[float] | None = None) -> TokenStore:
    """One store of ``stores`` in the proportions ``weights``, or ``epochs`` passes over each
    (all of each, once, when both are None)."""
    if len(stores) == 1 and weights is None and epochs is None:
        return stores[0]
    builder = StoreBuilder()
    rng = random.Random(f"lema-mix-{seed}")
    meta: dict[str, object] = {"truncated": 0, "dropped": 0, "sources": []}
    for k, (store, n) in enumerate(zip(stores, counts([len(s) for s in stores], weights, epochs))):
        if n and not len(store):
            raise DataError(f"data set {k + 1} has no examples to draw {n} from")
        chosen = list(range(len(store))) * (n // len(store)) if len(store) else []
        chosen += sorted(rng.sample(range(len(store)), n - len(chosen))) if len(store) else []
        for i in chosen:
            ids, mask = store.arrays(i)
            builder.add(ids.tolist(), mask.tolist())
        meta["truncated"] = int(meta["truncated"]) + int(store.meta.get("truncated", 0))  # type: ignore[call-overload]
        meta["dropped"] = int(meta["dropped"]) + int(store.meta.get("dropped", 0))  # type: ignore[call-overload]
        meta["sources"].append(n)  # type: ignore[attr-defined]
    first = stores[0].meta
    return builder.build({**{k: v for k, v in first.items() if k in ("format", "seq")}, **meta})
