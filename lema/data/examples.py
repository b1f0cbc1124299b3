"""Training data: read text or JSONL files into token examples, and batch them.

Three formats, detected from the extension and the first line:

* plain text (``.txt``, or anything whose first line is not a JSON object): the whole
  file is tokenized as one stream, an eos token appended, and cut into blocks of ``seq``
  tokens (the last, shorter block is kept);
* JSONL with a ``text`` field: one example per line (bos + text + eos, truncated to ``seq``);
* JSONL with ``prompt`` and ``completion`` fields: bos + prompt + completion + eos, with
  the loss on the completion only (the prompt's labels are -100).

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

from typing import Any, Iterator, Sequence

import attrs
import torch

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

IGNORE_INDEX = -100
_CHUNKS_PER_CALL = 8  # text chunks tokenized together (in parallel); bounds the tokenizer's memory


@attrs.frozen
class Example:
    """One training sequence: token ids and their labels (-100 where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __attrs_post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels) or not self.input_ids:
            raise ValueError("Example: input_ids and labels must be non-empty and of equal length")


@attrs.frozen
class Dataset:
    """The examples read from a file, and how they were read.

    Attributes:
        examples: the token sequences, in file order.
        format: ``"text"``, ``"jsonl-text"`` or ``"prompt-completion"``.
        path: the file.
        n_truncated: examples cut to ``seq`` tokens.
    """

    examples: tuple[Example, ...]
    format: str
    path: str
    n_truncated: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def n_target_tokens(self) -> int:
        return sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in self.examples)


def shipped_corpus() -> str:
    """The small English corpus shipped in the package (``lema/data/corpus.txt``)."""
    from importlib import resources

    return (resources.files("lema") / "data" / "corpus.txt").read_text(encoding="utf-8")


# -- reading ------------------------------------------------------------------------------


def read_examples(path: str | os.PathLike[str], tokenizer: Any, seq: int,
                  max_line_bytes: int = MAX_LINE_BYTES) -> Dataset:
    """Read and tokenize a training file.

    Args:
        path: a ``.txt`` file or a ``.jsonl`` file (``text``, or ``prompt`` + ``completion``).
        tokenizer: a transformers tokenizer with an eos token.
        seq: the longest sequence; text files are cut into blocks of this many tokens,
            longer JSONL examples are truncated.
        max_line_bytes: the longest line accepted (bytes of UTF-8), checked before
            anything is tokenized (default 1 MiB).

    Returns:
        A :class:`Dataset`.

    Raises:
        DataError: missing, empty, non-UTF-8 or malformed files, or a line over
            ``max_line_bytes``, with the file, line and fix.
    """
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 2:
        raise DataError(f"seq: {seq!r} must be an integer >= 2 (a sequence predicts its next tokens)")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos token; use a tokenizer that defines one")
    text = read_text(path, max_line_bytes)
    if detect_format(path, text) == "text":
        ids = _encode_text(tokenizer, text) + [eos]
        blocks = [tuple(ids[i:i + seq]) for i in range(0, len(ids), seq)]
        blocks = [b for b in blocks if len(b) >= 2] or [tuple(ids)]
        return Dataset(tuple(Example(b, b) for b in blocks), "text", str(path))
    kind, records = parse_jsonl(path, text)
    examples, truncated = [], 0
    # One batched tokenizer call per field: the fast tokenizer parallelises it.
    if kind == "jsonl-text":
        firsts, seconds = _encode_many(tokenizer, [r["text"] for _, r in records], True), None
    else:
        firsts = _encode_many(tokenizer, [r["prompt"] for _, r in records], True)
        seconds = _encode_many(tokenizer, [r["completion"] for _, r in records], False)
    for k, (number, record) in enumerate(records):
        if seconds is None:
            ids = firsts[k] + [eos]
            labels = list(ids)
            full = len(ids)
        else:
            if not record["completion"].strip():
                raise DataError(f"{path}, line {number}: \"completion\" is empty; there is nothing to learn "
                                "from this line: give it a completion or remove the line")
            prompt, completion = firsts[k], seconds[k] + [eos]
            full = len(prompt) + len(completion)
            prompt, completion = _fit(prompt, completion, seq)
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + completion
        ids, labels = ids[:seq], labels[:seq]
        truncated += len(ids) < full
        if len(ids) < 2:
            raise DataError(f"{path}, line {number}: the example is empty after tokenization; give it some text")
        examples.append(Example(tuple(ids), tuple(labels)))
    return Dataset(tuple(examples), kind, str(path), n_truncated=truncated)


def _fit(prompt: list[int], completion: list[int], seq: int) -> tuple[list[int], list[int]]:
    """Make prompt + completion fit ``seq``: drop the prompt's start (keeping at least half of
    ``seq`` for it if it is that long), then the completion's end."""
    if len(prompt) + len(completion) <= seq:
        return prompt, completion
    keep_prompt = max(seq - len(completion), min(len(prompt), seq // 2))
    prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt < len(prompt) else prompt
    return prompt, completion[: seq - len(prompt)]


def _encode_many(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _encode_text(tokenizer: Any, text: str, chunk_chars: int = 1 << 20) -> list[int]:
    # Encode a large file in line-aligned chunks so memory stays near one chunk's tokens.
    chunks, current, size = [], [], 0
    pieces = text.split("\n")
    for i, piece in enumerate(pieces):
        line = piece + "\n" if i < len(pieces) - 1 else piece  # exactly the file's text, chunked
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    ids: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for first in range(0, len(chunks), _CHUNKS_PER_CALL):
        for enc in tokenizer(chunks[first:first + _CHUNKS_PER_CALL], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
    return ([bos] if bos is not None else []) + ids


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


def batches(examples: Sequence[Example], batch_size: int, pad_id: int, *, seq: int | None = None,
            seed: int = 0, epochs: int | None = 1, shuffle: bool = True, skip: int = 0
            ) -> Iterator[dict[str, torch.Tensor]]:
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
            yield collate([examples[i] for i in chunk], pad_id, seq)
        index = 0
        epoch += 1
