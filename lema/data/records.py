"""Local data files read as records, line by line, with line-precise errors.

* JSON Lines (``.jsonl``, ``.json``): one JSON object per line, split at ``\\n`` only (a
  U+2028 inside a string is text, not a line end), parsed safely
  (:func:`lema.domain.json_values.parse_json`: nesting, huge numbers, unpaired surrogates);
* a JSON array of objects (the Alpaca ``.json`` form): each item is a record, named by
  its position and line;
* plain text (``.txt``): read in line-aligned chunks of about a megabyte, so a large file
  is never held whole.

A line longer than ``max_line_bytes`` (1 MiB by default) is refused with its number before
anything is tokenized (tokenizers need about 120 bytes of RAM per byte of one text). A
file that is one JSON object spread over several lines is named as such. Every other
problem is collected in :class:`Problems` and reported once, as a
:class:`~lema.errors.DataError` naming the file, the lines and the fix.

Example:
    >>> problems = Problems("train.jsonl")  # doctest: +SKIP
    >>> for record in json_records("train.jsonl", problems):  # doctest: +SKIP
    ...     print(record.where, record.fields)
    >>> problems.raise_if_any("each line must be one JSON object")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import attrs

from lema.data.text_files import MAX_LINE_BYTES, json_kind, one_document
from lema.domain.json_values import JsonValueError, parse_json
from lema.domain.units import format_size
from lema.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
MAX_REPORTED = 5  # bad lines listed in one error before "and N more"
_CHUNK_BYTES = 1 << 20
EMPTY_FIX = ('put training text in it (plain text, or JSONL lines like {"text": "..."}, '
             '{"prompt": "...", "completion": "..."} or {"messages": [...]})')

__all__ = ["MAX_LINE_BYTES", "Record", "Problems", "json_records", "text_chunks", "check_file", "json_kind"]


@attrs.frozen
class Record:
    """One row of data: where it is (``"line 3"``), its line (for sorting) and its fields."""

    where: str
    line: int
    fields: dict[str, Any]


class Problems:
    """Bad rows of one source, collected so that all of them are reported in one error."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[tuple[tuple[int, int], str]] = []

    def add(self, line: int, message: str, order: int = 0) -> None:
        """Record ``message`` (which starts with the row's location) for sorting by ``(order, line)``."""
        self.items.append(((order, line), message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def scoped(self, prefix: str, order: int) -> "Problems":
        """The same list, for one file of a folder: messages start with ``prefix`` (the
        file's name) and sort after the files before it (``order``)."""
        return _Scoped(self, prefix, order)

    def raise_if_any(self, fix: str) -> None:
        """One DataError listing the problems by position (at most five, then a count)."""
        if not self.items:
            return
        texts = [m for _, m in sorted(self.items, key=lambda item: item[0])]
        if len(texts) == 1:
            raise DataError(f"{self.name}, {texts[0]}; {fix}")
        shown = texts[:MAX_REPORTED]
        more = f"; and {len(texts) - len(shown)} more bad lines" if len(texts) > len(shown) else ""
        raise DataError(f"{self.name}: {len(texts)} bad lines: " + "; ".join(shown) + more + f"; {fix}")


class _Scoped(Problems):
    def __init__(self, parent: Problems, prefix: str, order: int) -> None:
        super().__init__(parent.name)
        self.items = parent.items  # shared: the parent raises them all
        self.prefix, self.order = prefix, order

    def add(self, line: int, message: str, order: int = 0) -> None:
        self.items.append(((self.order, line), f"{self.prefix}{message}"))


def check_file(path: str | os.PathLike[str]) -> Path:
    """The path of an existing data file, or a DataError saying what is wrong with it."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such data file; check the path")
    if not p.is_file():
        raise DataError(f"{p}: is not a file; pass a data file or a folder of them")
    return p


def _check_cap(max_line_bytes: int) -> None:
    if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) or max_line_bytes < 1:
        raise DataError(f"max_line_bytes: {max_line_bytes!r} must be a positive integer")


def long_line(path: Path, line: int, length: int, max_line_bytes: int) -> str:
    """The message for a line over the cap (the same words for every reader)."""
    return (f"{path}, line {line}: {length:,} bytes ({format_size(length)}) of text on one line, more than the "
            f"{format_size(max_line_bytes)} limit; split it into shorter lines or examples, or raise the limit "
            "(--max-line-size, or read_examples(max_line_bytes=...))")


def _decode(raw: bytes, path: Path, line: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        inside = raw.count(b"\n", 0, exc.start)
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}, line {line + inside}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset "
                        f"{offset + exc.start}, column {column}); re-save the file as UTF-8") from None


def _raw_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, raw line with its ending)``, split at ``\\n`` only."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            size = len(raw)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is not data
                raw, offset = raw[3:], 3
                size -= 3
            yield number, offset, raw
            offset += size


def _content(raw: bytes) -> bytes:
    return raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw


def json_records(path: str | os.PathLike[str], problems: Problems,
                 max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Record]:
    """The JSON objects of a JSON Lines file, or the items of a JSON array file.

    The file is an array when its first line does not hold a JSON value by itself and the
    file starts with ``[`` (a pretty-printed array), or when it is one line holding an
    array. Bad lines (invalid JSON, not an object) go to ``problems`` and are skipped.

    Raises:
        DataError: a missing, empty or non-UTF-8 file (at the first bad byte), a line over
            ``max_line_bytes``, or one JSON object spread over several lines.
    """
    p = check_file(path)
    _check_cap(max_line_bytes)
    mode = _mode(p, max_line_bytes)
    if mode == "array":
        yield from _array_records(p, problems, max_line_bytes)
        return
    seen = False
    for number, offset, raw in _raw_lines(p):
        raw = _content(raw)
        if len(raw) > max_line_bytes:
            raise DataError(long_line(p, number, len(raw), max_line_bytes))
        text = _decode(raw, p, number, offset)
        if not text.strip():
            continue
        seen = True
        try:
            value = parse_json(text)
        except JsonValueError as exc:
            problems.add(number, f"line {number}: {exc}")
            continue
        if not isinstance(value, dict):
            problems.add(number, f"line {number}: expected a JSON object like {{\"text\": \"...\"}}, "
                                 f"got {json_kind(value)}")
            continue
        yield Record(f"line {number}", number, value)
    if not seen:
        raise DataError(f"{p}: the file is empty; {EMPTY_FIX}")


def _mode(path: Path, max_line_bytes: int) -> str:
    """``"array"`` or ``"lines"`` (see :func:`json_records`)."""
    lines = (_content(raw) for _, _, raw in _raw_lines(path))
    first = next((line for line in lines if line.strip()), None)
    if first is None or len(first) > max_line_bytes:
        return "lines"  # empty, or refused by the line reader
    try:
        value = parse_json(first)
    except JsonValueError:
        value = None
        head = first.lstrip()[:1]
        if head == b"[":
            return "array"
        if head == b"{":
            raw = path.read_bytes()
            if len(raw) <= 64 * max_line_bytes:  # one document of a sane size: say what it is
                try:
                    document = one_document(raw.decode("utf-8").lstrip("\ufeff"))
                except UnicodeDecodeError:
                    document = None
                if document is not None:
                    raise DataError(f"{path}: the file is {document}, not JSON Lines; put one JSON object on each "
                                    "line, or give the records as a JSON array") from None
        return "lines"
    if isinstance(value, list) and next((line for line in lines if line.strip()), None) is None:
        return "array"  # the whole file is one line holding an array
    return "lines"


def _array_records(path: Path, problems: Problems, max_line_bytes: int) -> Iterator[Record]:
    # A JSON array is read whole (json cannot stream it), checked by parse_json (nesting,
    # numbers, surrogates), then walked item by item with raw_decode so that every item
    # has its line number.
    from lema.data.text_files import check_line_lengths

    raw = path.read_bytes()
    check_line_lengths(path, raw, max_line_bytes)
    text = _decode(raw, path, 1, 0).lstrip("\ufeff")
    try:
        parse_json(text)
    except JsonValueError as exc:
        raise DataError(f"{path}: the file starts like a JSON array but is not valid JSON: {exc}; fix it, or put "
                        "one JSON object on each line") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    count = 0
    while True:
        pos = _skip_space(text, pos)
        if text[pos] == "]":
            break
        value, end = decoder.raw_decode(text, pos)
        count += 1
        number = text.count("\n", 0, pos) + 1
        if isinstance(value, dict):
            yield Record(f"item {count} (line {number})", number, value)
        else:
            problems.add(number, f"item {count} (line {number}): expected a JSON object like "
                                 f"{{\"instruction\": \"...\", \"output\": \"...\"}}, got {json_kind(value)}")
        pos = _skip_space(text, end)
        if text[pos] == ",":
            pos += 1
    if count == 0:
        raise DataError(f"{path}: the JSON array is empty; {EMPTY_FIX}")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def text_chunks(path: str | os.PathLike[str], max_line_bytes: int = MAX_LINE_BYTES,
                chunk_bytes: int = _CHUNK_BYTES) -> Iterator[str]:
    """A text file in line-aligned chunks of about ``chunk_bytes`` (the memory of one chunk),
    exactly as written (line endings kept).

    Raises:
        DataError: a missing, empty, non-UTF-8 file, or a line over ``max_line_bytes``.
    """
    p = check_file(path)
    _check_cap(max_line_bytes)
    pending: list[bytes] = []
    size, start_line, start_offset, any_text = 0, 1, 0, False
    for number, offset, raw in _raw_lines(p):
        if len(_content(raw)) > max_line_bytes:
            raise DataError(long_line(p, number, len(_content(raw)), max_line_bytes))
        if not pending:
            start_line, start_offset = number, offset
        pending.append(raw)
        size += len(raw)
        if size >= chunk_bytes:
            text = _decode(b"".join(pending), p, start_line, start_offset)
            any_text = any_text or bool(text.strip())
            yield text
            pending, size = [], 0
    if pending:
        text = _decode(b"".join(pending), p, start_line, start_offset)
        any_text = any_text or bool(text.strip())
        if any_text:
            yield text
    if not any_text:
        raise DataError(f"{p}: the file is empty; {EMPTY_FIX}")
