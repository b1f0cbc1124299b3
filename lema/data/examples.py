"""Training data as examples, and batching them.

:func:`read_examples` reads training data into a :class:`Dataset` of :class:`Example`
(token ids and labels, -100 where no loss is taken); :func:`batches` cuts examples into
seeded, resumable, padded batches. The formats (text, JSONL text, prompt/completion, chat
messages, ShareGPT, Alpaca) and the sources (JSONL, JSON, Parquet, CSV, folders, Hub ids)
are described in :mod:`lema.data.formats` and :mod:`lema.data.sources`; the examples are
held in a compact :class:`~lema.data.store.TokenStore` (about 5 bytes a token).

Every problem with a file is a :class:`~lema.errors.DataError` naming the file, the line
and the fix. The shipped demo corpus is :func:`shipped_corpus`.

Example:
    >>> data = read_examples("train.jsonl", tokenizer, seq=256)  # doctest: +SKIP
    >>> for batch in batches(data.examples, batch_size=8, pad_id=tokenizer.pad_token_id, seed=0):
    ...     trainer.train_step(batch["input_ids"], batch["labels"], batch["attention_mask"])
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Iterator, Sequence

import attrs
import torch

from lema.data.store import IGNORE_INDEX, Example
from lema.data.text_files import (
    JSONL_SUFFIXES,
    MAX_LINE_BYTES,
    TEXT_SUFFIXES,
    detect_format,
    parse_jsonl,
    read_text,
)
from lema.errors import DataError

__all__ = ["IGNORE_INDEX", "JSONL_SUFFIXES", "MAX_LINE_BYTES", "TEXT_SUFFIXES", "Dataset", "Example", "batch_order",
           "batches", "batches_per_epoch", "collate", "detect_format", "parse_jsonl", "read_examples", "read_text",
           "shipped_corpus"]


@attrs.frozen
class Dataset:
    """The examples read from a file, and how they were read.

    Attributes:
        examples: the token sequences, in file order (a :class:`~lema.data.store.TokenStore`).
        format: ``"text"``, ``"jsonl-text"``, ``"prompt-completion"``, ``"messages"``,
            ``"sharegpt"`` or ``"alpaca"``.
        path: the file.
        n_truncated: examples cut to ``seq`` tokens.
    """

    examples: Sequence[Example]
    format: str
    path: str
    n_truncated: int = 0

    @property
    def n_tokens(self) -> int:
        fast = getattr(self.examples, "n_tokens", None)
        return int(fast) if fast is not None else sum(len(e.input_ids) for e in self.examples)

    @property
    def n_target_tokens(self) -> int:
        fast = getattr(self.examples, "n_target_tokens", None)
        if fast is not None:
            return int(fast)
        return sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in self.examples)


def shipped_corpus() -> str:
    """The small English corpus shipped in the package (``lema/data/corpus.txt``)."""
    from importlib import resources

    return (resources.files("lema") / "data" / "corpus.txt").read_text(encoding="utf-8")


def read_examples(path: str | os.PathLike[str], tokenizer: Any, seq: int, max_line_bytes: int = MAX_LINE_BYTES, *,
                  format: str | None = None, chat_template: str | None = None) -> Dataset:
    """Read and tokenize training data (no caching; ``lema train`` caches).

    Args:
        path: ``--data``: a ``.txt``, ``.jsonl``/``.json``, ``.parquet``/``.csv`` file, a
            folder of them, a saved dataset, or a Hub dataset id.
        tokenizer: a transformers tokenizer with an eos token.
        seq: the longest sequence; text files are cut into blocks of this many tokens,
            longer examples are truncated.
        max_line_bytes: the longest line of a text or JSON file accepted (bytes of UTF-8),
            refused with its number before it is tokenized (default 1 MiB).
        format: force a format (:data:`lema.data.formats.FORMATS`); default: detected.
        chat_template: a template for chat formats (default: the tokenizer's).

    Returns:
        A :class:`Dataset`.

    Raises:
        DataError: missing, empty, non-UTF-8 or malformed data, or a line over
            ``max_line_bytes``, with the file, line and fix.
    """
    from lema.data.loading import DataOptions, load_data

    data = load_data(path, tokenizer, DataOptions(seq=seq, format=format, chat_template=chat_template,
                                                  max_line_bytes=max_line_bytes))
    return Dataset(data.store, data.format, str(path), n_truncated=data.truncated)


# -- batching ------------------------------------------------------------------------------


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    """Batches in one pass over ``n_examples`` (the last batch may be smaller)."""
    return -(-n_examples // batch_size)


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """The example indices of each batch of one epoch: a seeded permutation, cut in batches."""
    order = list(range(n_examples))
    if shuffle:
        random.Random(f"lema-data-{seed}-{epoch}").shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]


def collate(examples: Sequence[Example], pad_id: int, seq: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest (at most ``seq``) into ``input_ids``, ``labels``
    (-100 on padding) and ``attention_mask`` tensors of shape ``(batch, length)``."""
    length = max(len(e.input_ids) for e in examples)
    if seq is not None:
        length = min(length, seq)
    ids = torch.full((len(examples), length), int(pad_id), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = min(len(e.input_ids), length)
        ids[row, :n] = torch.tensor(e.input_ids[:n])
        labels[row, :n] = torch.tensor(e.labels[:n])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(examples: Sequence[Any], batch_size: int, pad_id: int, *, seq: int | None = None,
            seed: int = 0, epochs: int | None = 1, shuffle: bool = True, skip: int = 0,
            collate_fn: Callable[..., dict[str, torch.Tensor]] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Yield collated batches, epoch after epoch, in a seeded order.

    The order depends only on ``(len(examples), batch_size, seed)``, so a resumed run that
    passes ``skip=k`` sees exactly the batches a straight run sees after its first ``k``.

    Args:
        examples: the examples.
        batch_size: examples per batch (the last batch of an epoch may be smaller).
        pad_id: the token id used for padding.
        seq: the longest batch length (longer examples are cut).
        seed: the shuffle seed.
        epochs: passes over the data; None for an endless stream.
        shuffle: False keeps file order.
        skip: batches to skip at the start (for resuming).
        collate_fn: ``collate_fn(items, pad_id, seq)`` makes a batch (default :func:`collate`;
            packed rows use :func:`lema.data.packing.collate_packed`).
    """
    if batch_size < 1:
        raise DataError(f"batch size: {batch_size!r} must be >= 1")
    if not examples:
        raise DataError("no training examples to batch")
    per_epoch = batches_per_epoch(len(examples), batch_size)
    epoch, index = divmod(max(skip, 0), per_epoch)
    while epochs is None or epoch < epochs:
        order = batch_order(len(examples), batch_size, seed, epoch, shuffle)
        for chunk in order[index:]:
            yield (collate_fn or collate)([examples[i] for i in chunk], pad_id, seq)
        index = 0
        epoch += 1
