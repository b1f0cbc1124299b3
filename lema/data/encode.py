"""Samples -> token ids and loss masks, a batch of tokenizer calls at a time.

* text: BOS (when the tokenizer adds one) + text + EOS, truncated to ``seq``;
* prompt + completion: the same with the loss on the completion only; when too long,
  the prompt's start is dropped first (keeping at least half of ``seq`` for it), then the
  completion's end;
* a conversation: rendered with the chat template (:mod:`lema.data.chat`), the loss on
  the assistant's tokens, truncated to ``seq``; one with no assistant token left within
  ``seq`` is dropped and counted;
* a plain text file: one stream (BOS + text + EOS) cut into blocks of ``seq`` tokens.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import attrs

from lema.data import chat
from lema.data.formats import COMPLETION, TEXT, Sample
from lema.data.records import Problems
from lema.data.store import StoreBuilder, TokenStore
from lema.errors import DataError

BATCH = 512  # samples per tokenizer call


@attrs.define
class Counts:
    """What happened to the examples while encoding."""

    truncated: int = 0
    dropped: int = 0


def encode_samples(samples: Iterable[Sample], tokenizer: Any, seq: int, problems: Problems,
                   template: str | None = None, meta: dict[str, Any] | None = None, *,
                   train_on_inputs: bool = False, roles: tuple[str, ...] = ("assistant",)) -> TokenStore:
    """Tokenize ``samples`` into a store (``meta`` gains ``truncated`` and ``dropped``).

    ``train_on_inputs``: every token carries the loss (prompts and every turn too);
    ``roles``: the roles whose turns carry it in conversations.

    Problems (an empty example, a conversation the template cannot render) go to
    ``problems``; the caller raises them.
    """
    eos = tokenizer.eos_token_id
    builder = StoreBuilder()
    counts = Counts()
    for group in _groups(samples, BATCH):
        texts = [s for s in group if s.kind == TEXT]
        pairs = [s for s in group if s.kind == COMPLETION]
        chats = [s for s in group if s.kind == "chat"]
        encoded: dict[int, tuple[list[int], list[int]] | None] = {}
        if texts:
            for s, ids in zip(texts, _encode(tokenizer, [s.text for s in texts], True)):
                ids = ids + [eos]
                encoded[id(s)] = _cut(ids, [1] * len(ids), seq, counts)
        if pairs:
            prompts = _encode(tokenizer, [s.text for s in pairs], True)
            completions = _encode(tokenizer, [s.completion for s in pairs], False)
            for s, p, c in zip(pairs, prompts, completions):
                c = c + [eos]
                full = len(p) + len(c)
                p, c = _fit(p, c, seq)
                counts.truncated += len(p) + len(c) < full
                encoded[id(s)] = (p + c, [int(train_on_inputs)] * len(p) + [1] * len(c))
        if chats:
            if template is None:
                problems.add(chats[0].line, f"{chats[0].where}: a conversation, but the tokenizer has no chat "
                                            "template")
                problems.raise_if_any("pass one with --chat-template FILE (a Jinja template) or "
                                      f"--chat-template {next(iter(chat.BUILTIN))}")
            for s, result in zip(chats, chat.render_batch(tokenizer, [s.messages for s in chats], template, roles)):
                if isinstance(result, str):  # the template's problem, not this row's: say it once
                    raise DataError(f"{problems.name}, {s.where}: {result}")
                ids, mask = result
                cut = _cut(ids, [1] * len(ids) if train_on_inputs else mask, seq, counts)
                if cut is not None and not any(cut[1]):
                    counts.dropped += 1
                    cut = None
                    encoded[id(s)] = None
                    continue
                encoded[id(s)] = cut
        for s in group:
            item = encoded.get(id(s))
            if item is None:
                continue
            ids, mask = item
            if len(ids) < 2:
                problems.add(s.line, f"{s.where}: the example is empty after tokenization; give it some text")
                continue
            builder.add(ids, mask)
    return builder.build({**(meta or {}), "truncated": counts.truncated, "dropped": counts.dropped})


def encode_stream(chunks: Iterable[str], tokenizer: Any, seq: int, meta: dict[str, Any] | None = None) -> TokenStore:
    """One token stream (BOS + every chunk's tokens + EOS) cut into blocks of ``seq``; the
    last, shorter block is kept (a block of one token is dropped unless it is all there is)."""
    import numpy as np

    bos = getattr(tokenizer, "bos_token_id", None)
    parts: list[np.ndarray] = [np.asarray([bos], dtype=np.int32)] if bos is not None else []
    pending: list[str] = []
    chunk: str | None
    for chunk in itertools.chain(chunks, [None]):
        if chunk is not None:
            pending.append(chunk)
        if pending and (chunk is None or len(pending) >= 8):  # one tokenizer call per 8 chunks: in parallel
            parts.extend(np.asarray(ids, dtype=np.int32) for ids in _encode(tokenizer, pending, False))
            pending = []
    parts.append(np.asarray([tokenizer.eos_token_id], dtype=np.int32))
    tokens = np.concatenate(parts)
    del parts
    starts = list(range(0, len(tokens), seq))
    if len(starts) > 1 and len(tokens) - starts[-1] < 2:  # a last block of one token predicts nothing
        tokens = tokens[:starts.pop()]
    offsets = np.asarray(starts + [len(tokens)], dtype=np.int64)
    return TokenStore(tokens, np.ones(len(tokens), dtype=np.uint8), offsets,
                      {**(meta or {}), "truncated": 0, "dropped": 0})


def _cut(ids: list[int], mask: list[int], seq: int, counts: Counts) -> tuple[list[int], list[int]]:
    if len(ids) > seq:
        counts.truncated += 1
        return ids[:seq], mask[:seq]
    return ids, mask


def _fit(prompt: list[int], completion: list[int], seq: int) -> tuple[list[int], list[int]]:
    """Make prompt + completion fit ``seq``: drop the prompt's start (keeping at least half of
    ``seq`` for it if it is that long), then the completion's end."""
    if len(prompt) + len(completion) <= seq:
        return prompt, completion
    keep_prompt = max(seq - len(completion), min(len(prompt), seq // 2))
    prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt < len(prompt) else prompt
    return prompt, completion[: seq - len(prompt)]


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _groups(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    group: list[Sample] = []
    for item in items:
        group.append(item)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group
