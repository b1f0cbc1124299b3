"""``--data`` to a tokenized store: source -> format -> samples -> tokens, cached.

Example:
    >>> data = load_data("chat.jsonl", tokenizer, DataOptions(seq=512))  # doctest: +SKIP
    >>> data.format, len(data.store), data.store.n_tokens  # doctest: +SKIP
    ('messages', 1000, 81234)
"""

from __future__ import annotations

import itertools
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import attrs

from lema.data import cache, chat, formats
from lema.data.encode import encode_samples, encode_stream
from lema.data.field_map import FieldMap
from lema.data.records import MAX_LINE_BYTES, Problems, Record
from lema.data.sources import Source, open_source
from lema.data.store import TokenStore
from lema.errors import DataError


@attrs.frozen(kw_only=True)
class DataOptions:
    """How data is read and tokenized.

    Attributes:
        seq: the longest example in tokens (plain text is cut into blocks of this size).
        format: one of :data:`lema.data.formats.FORMATS`, or None to detect it.
        chat_template: ``--chat-template``: a built-in name, a file or the template text;
            None: the tokenizer's own.
        cache_dir: where tokenized stores are cached; None: no caching.
        max_line_bytes: the longest line of a text or JSON file (bytes of UTF-8).
    """

    seq: int
    format: str | None = None
    chat_template: str | None = None
    cache_dir: Path | None = None
    max_line_bytes: int = MAX_LINE_BYTES
    fields: FieldMap = FieldMap()
    train_on_inputs: bool = False
    roles_to_train: tuple[str, ...] = ("assistant",)
    progress: Callable[[str], None] | None = attrs.field(default=None, eq=False)
    progress_every: float = attrs.field(default=10.0, eq=False)


class _Ticker:
    """Counts what a pass over the data has done; says it every ``every`` seconds (a large
    data set is checked, then tokenized, for minutes: the user sees it move)."""

    def __init__(self, say: Callable[[str], None] | None, what: str, unit: str, every: float = 10.0) -> None:
        self._say, self._what, self._unit, self._every = say, what, unit, every
        self._began = self._last = time.monotonic()
        self.count = 0

    def wrap(self, items: Iterable[Any], size: Callable[[Any], int]) -> Iterator[Any]:
        for item in items:
            yield item
            self.count += size(item)
            if self._say is not None:
                now = time.monotonic()
                if now - self._last >= self._every:
                    self._last = now
                    done = (f"{self.count / 1e6:,.0f} million characters" if self._unit == "chars"
                            else f"{self.count:,} {self._unit}")
                    self._say(f"      {self._what}: {done} so far ({now - self._began:.0f} s)")


@attrs.frozen
class TrainingData:
    """Tokenized data and how it was read."""

    store: TokenStore
    format: str
    name: str
    cached: bool = False

    @property
    def truncated(self) -> int:
        return int(self.store.meta.get("truncated", 0))

    @property
    def dropped(self) -> int:
        return int(self.store.meta.get("dropped", 0))

    def describe(self) -> str:
        """``"messages, 1,000 examples, 81,234 tokens (3 truncated to --seq 512)"``."""
        s = self.store
        notes = []
        if self.truncated:
            notes.append(f"{self.truncated} truncated to --seq {s.meta.get('seq')}")
        if self.dropped:
            notes.append(f"{self.dropped} dropped: no assistant token within --seq")
        if self.cached:
            notes.append("tokens from the cache")
        return (f"{self.format}, {len(s):,} examples, {s.n_tokens:,} tokens"
                + (f" ({'; '.join(notes)})" if notes else ""))


def load_data(spec: str | os.PathLike[str], tokenizer: Any, options: DataOptions) -> TrainingData:
    """Read and tokenize ``spec`` (a file, folder, saved dataset or Hub id).

    The data is read twice: once to check every row (so that a bad row, or a line over the
    cap, is refused before anything is tokenized), then to tokenize it; neither pass holds
    more than a batch of rows.

    Raises:
        DataError: unreadable data, bad rows (all of them, by line, in one error), no
            example left, a chat format without a chat template.
        MissingDependencyError: a source that needs the ``datasets`` extra.
    """
    seq = options.seq
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 2:
        raise DataError(f"seq: {seq!r} must be an integer >= 2 (a sequence predicts its next tokens)")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError("the tokenizer has no eos token; use a tokenizer that defines one")
    fmt = formats.check_format(options.format)
    source = open_source(spec, options.max_line_bytes)
    template = chat.resolve_template(tokenizer, options.chat_template)
    if options.cache_dir is not None:
        # The cap is in the key too: the same data under a lower cap is checked (and refused) again.
        key = cache.cache_key(source.identity, tokenizer, {"seq": seq, "format": fmt, "template": template,
                                                           "max_line_bytes": options.max_line_bytes,
                                                           **_mapping_key(options)})
        hit = cache.load(Path(options.cache_dir), key)
        if hit is not None:
            return TrainingData(hit, str(hit.meta.get("format")), source.name, cached=True)
    data = _read(source, tokenizer, seq, fmt, template, options.progress, options.progress_every, options)
    if options.cache_dir is not None:
        cache.save(Path(options.cache_dir), key, data.store)
    return data


def _mapping_key(options: DataOptions) -> dict[str, Any]:
    """The mapping options in the cache key (none when they are the defaults: earlier keys still hit)."""
    if options.fields.identity and not options.train_on_inputs and options.roles_to_train == ("assistant",):
        return {}
    return {"fields": options.fields.describe(), "train_on_inputs": options.train_on_inputs,
            "roles_to_train": list(options.roles_to_train)}


def _read(source: Source, tokenizer: Any, seq: int, fmt: str | None, template: str | None,
          say: Callable[[str], None] | None = None, every: float = 10.0,
          options: DataOptions | None = None) -> TrainingData:
    options = options if options is not None else DataOptions(seq=seq)
    fix = formats.fix(fmt)
    if source.kind == "text":
        if fmt not in (None, formats.TEXT):
            raise DataError(f"{source.name}: plain text is one text stream; --format {fmt} needs records "
                            "(JSONL, JSON, Parquet, CSV)")
        assert source.chunks is not None
        # the checks (UTF-8, line lengths, emptiness) before any token
        for _ in _Ticker(say, f"checking {source.name}", "chars", every).wrap(source.chunks(), len):
            pass
        chunks = _Ticker(say, f"tokenizing {source.name}", "chars", every).wrap(source.chunks(), len)
        store = encode_stream(chunks, tokenizer, seq, {"format": "text", "seq": seq})
        return TrainingData(store, "text", source.name)
    assert source.rows is not None
    read_rows = source.rows
    if not options.fields.identity:
        def read_rows(problems: Problems) -> Iterator[Record]:  # the data's names -> LEMA's
            assert source.rows is not None
            return map(options.fields.apply, source.rows(problems))
    problems = Problems(source.name)
    rows = _Ticker(say, f"checking {source.name}", "records", every).wrap(read_rows(problems), lambda _: 1)
    first = next(rows, None)
    if first is None:
        problems.raise_if_any(fix)
        raise DataError(f"{source.name}: no records in the data; give it some examples")
    fmt = fmt or formats.detect(first.fields)
    if fmt is None:
        problems.add(first.line, formats.undetected(first))
        for _ in rows:  # report the other bad lines too
            pass
        problems.raise_if_any(fix)
    assert fmt is not None
    name = "jsonl-text" if fmt == formats.TEXT and source.json_lines else fmt
    for _ in _samples(itertools.chain([first], rows), fmt, problems, template is not None):
        pass  # every row checked before anything is tokenized
    problems.raise_if_any(fix)
    ticker = _Ticker(say, f"tokenizing {source.name}", "records", every)
    samples = _samples(ticker.wrap(read_rows(problems), lambda _: 1), fmt, problems, template is not None)
    store = encode_samples(samples, tokenizer, seq, problems, template, {"format": name, "seq": seq},
                           train_on_inputs=options.train_on_inputs, roles=options.roles_to_train)
    problems.raise_if_any(fix)
    if len(store) == 0:
        raise DataError(f"{source.name}: no example has a token to learn within --seq {seq} "
                        f"({store.meta.get('dropped', 0)} dropped); raise --seq")
    return TrainingData(store, name, source.name)


def _samples(rows: Iterator[Record], fmt: str, problems: Problems, chat_available: bool) -> Iterator[formats.Sample]:
    for record in rows:
        sample = formats.to_sample(fmt, record, problems, chat_available)
        if sample is not None:
            yield sample


def split_eval(store: TokenStore, fraction: float, seed: int) -> tuple[TokenStore, TokenStore]:
    """``(train, eval)``: a seeded ``fraction`` of the examples held out (at least one).

    Raises:
        DataError: a fraction outside (0, 1), or too few examples to split.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--eval-split: {fraction!r} must be a fraction between 0 and 1, e.g. 0.05")
    n = len(store)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(f"--eval-split {fraction}: {n} examples are too few to hold {n_eval} out; "
                        "pass --eval-data or more data")
    order = list(range(n))
    random.Random(f"lema-eval-{seed}").shuffle(order)
    held = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    return store.subset(kept), store.subset(held)
