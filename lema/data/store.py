"""Tokenized examples stored compactly: three flat numpy arrays, about 5 bytes a token.

* ``tokens``: every example's token ids one after another (int32, 4 bytes a token);
* ``mask``: 1 where the token is a label the loss is taken on, 0 where it is not (a
  prompt, a user turn); uint8, 1 byte a token;
* ``offsets``: where each example starts (int64, ``n + 1`` entries).

Python tuples of ints cost about 40 bytes a token (an 8-byte slot plus a 28-byte int
object, twice for labels); a 1B-token corpus held that way needs ~40 GB of RAM, held here
~5 GB, or nothing but page cache when the store is memory-mapped from the data cache.

Example:
    >>> b = StoreBuilder()
    >>> b.add([1, 5, 6, 2], [0, 1, 1, 1])
    >>> store = b.build()
    >>> store[0].labels
    (-100, 5, 6, 2)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import numpy as np

IGNORE_INDEX = -100
_FILES = ("tokens.npy", "mask.npy", "offsets.npy")


@attrs.frozen
class Example:
    """One training sequence: token ids and their labels (-100 where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __attrs_post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels) or not self.input_ids:
            raise ValueError("Example: input_ids and labels must be non-empty and of equal length")


class TokenStore(Sequence[Example]):
    """A sequence of :class:`Example` backed by flat arrays.

    Indexing builds the one example asked for; :meth:`arrays` gives its arrays without
    copying. The arrays may be memory-mapped (:meth:`load`). A store made by
    :meth:`subset` is a view: the same arrays and a list of the examples it holds.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
                 meta: dict[str, Any] | None = None, index: np.ndarray | None = None) -> None:
        if tokens.shape != mask.shape or offsets.ndim != 1 or len(offsets) < 1 or int(offsets[-1]) != len(tokens):
            raise ValueError("TokenStore: tokens and mask must have one entry per token and offsets end at their length")
        self.tokens, self.mask, self.offsets = tokens, mask, offsets
        self.index = index
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(token ids, loss mask)`` of example ``index`` (views, no copy)."""
        j = index if self.index is None else int(self.index[index])
        start, end = int(self.offsets[j]), int(self.offsets[j + 1])
        return self.tokens[start:end], self.mask[start:end]

    def __getitem__(self, index: int | slice) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        ids, mask = self.arrays(index)
        labels = np.where(mask.astype(bool), ids, IGNORE_INDEX)
        return Example(tuple(ids.tolist()), tuple(labels.tolist()))

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    def lengths(self) -> np.ndarray:
        """Tokens in each example."""
        lengths = np.diff(self.offsets)
        return lengths if self.index is None else lengths[self.index]

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1]) if self.index is None else int(self.lengths().sum())

    @property
    def n_target_tokens(self) -> int:
        if self.index is None:
            return int(np.count_nonzero(self.mask))
        per_example = np.add.reduceat(self.mask.astype(np.int64), self.offsets[:-1]) if len(self.mask) else []
        return int(np.asarray(per_example)[self.index].sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what the store costs in RAM when read whole)."""
        return int(self.tokens.nbytes + self.mask.nbytes + self.offsets.nbytes
                   + (0 if self.index is None else self.index.nbytes))

    def max_token(self) -> int:
        return int(self.tokens.max()) if len(self.tokens) else -1

    def subset(self, indices: Sequence[int]) -> "TokenStore":
        """A view holding the examples at ``indices`` (of this store), in that order."""
        chosen = np.asarray(indices, dtype=np.int64)
        if self.index is not None:
            chosen = self.index[chosen]
        return TokenStore(self.tokens, self.mask, self.offsets, dict(self.meta), index=chosen)

    # -- files ----------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the arrays (``.npy``, no pickle) and ``meta.json`` into ``folder``."""
        if self.index is not None:
            raise ValueError("TokenStore.save: save the whole store, not a subset view")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in zip(_FILES, (self.tokens, self.mask, self.offsets)):
            np.save(folder / name, np.ascontiguousarray(array), allow_pickle=False)
        (folder / "meta.json").write_text(json.dumps(self.meta), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | os.PathLike[str], mmap: bool = True) -> "TokenStore":
        """Open a saved store; with ``mmap`` the arrays are memory-mapped (read-only)."""
        folder = Path(folder)
        mode = "r" if mmap else None
        tokens, mask, offsets = (np.load(folder / name, mmap_mode=mode, allow_pickle=False) for name in _FILES)
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return cls(tokens, mask, offsets, meta)


class StoreBuilder:
    """Collects examples into a :class:`TokenStore`, a chunk of arrays at a time."""

    _FLUSH = 1 << 20  # tokens held as Python ints before they become an array

    def __init__(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._pending_ids: list[int] = []
        self._pending_mask: list[int] = []

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, ids: Sequence[int], mask: Sequence[int]) -> None:
        """Append one example: its token ids and its loss mask (1: a label)."""
        if len(ids) != len(mask):
            raise ValueError("StoreBuilder.add: ids and mask differ in length")
        self._pending_ids.extend(ids)
        self._pending_mask.extend(mask)
        self._lengths.append(len(ids))
        if len(self._pending_ids) >= self._FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._pending_ids:
            self._tokens.append(np.asarray(self._pending_ids, dtype=np.int32))
            self._mask.append(np.asarray(self._pending_mask, dtype=np.uint8))
            self._pending_ids, self._pending_mask = [], []

    def build(self, meta: dict[str, Any] | None = None) -> TokenStore:
        self._flush()
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, dtype=np.int32)
        mask = np.concatenate(self._mask) if self._mask else np.zeros(0, dtype=np.uint8)
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(self._lengths, dtype=np.int64), out=offsets[1:])
        self._tokens, self._mask = [], []
        return TokenStore(tokens, mask, offsets, meta)
