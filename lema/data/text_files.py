"""Reading a training file's text: UTF-8, a cap on line length, lines, the format, JSONL records.

Lines end at ``\\n`` only (a ``\\r`` before it is dropped): JSON strings may hold U+2028,
U+0085 or form feeds, which ``str.splitlines`` would treat as line ends and cut a valid
record in two. A line longer than ``max_line_bytes`` (default 1 MiB of UTF-8) is refused
with its line number before anything is tokenized: tokenizers need about 120 bytes of RAM
per byte of text, so one 50 MB line would take ~6 GB. A file that is one JSON document (an
array such as an Alpaca ``.json`` file, or one object spread over many lines) is named as
such instead of being reported line by line.

Every problem is a :class:`~lema.errors.DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lema.domain.json_values import JsonValueError, parse_json
from lema.domain.units import format_size
from lema.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
MAX_LINE_BYTES = 1 << 20  # the default cap: 1 MiB of text on one line
_MAX_REPORTED = 5  # bad lines listed in one error before "and N more"
_ONE_PER_LINE = ("each line must be one JSON object with a \"text\" field, or \"prompt\" and \"completion\" "
                 "fields")


def read_text(path: str | os.PathLike[str], max_line_bytes: int = MAX_LINE_BYTES) -> str:
    """A file's text, or a DataError for a missing, empty or non-UTF-8 file or an overlong line.

    Args:
        path: the file.
        max_line_bytes: the longest line accepted, in bytes of UTF-8.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such data file; check the path")
    if not p.is_file():
        raise DataError(f"{p}: is not a file; pass a .txt or .jsonl file")
    raw = p.read_bytes()
    check_line_lengths(p, raw, max_line_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{p}, line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset "
                        f"{exc.start}, column {column}); re-save the file as UTF-8") from None
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark (Windows editors) is not data
        text = text[1:]
    if not text.strip():
        raise DataError(f"{p}: the file is empty; put training text in it (plain text, or JSONL "
                        'lines like {"text": "..."} or {"prompt": "...", "completion": "..."})')
    return text


def check_line_lengths(path: str | os.PathLike[str], raw: bytes, max_line_bytes: int) -> None:
    """DataError naming the first line of ``raw`` longer than ``max_line_bytes`` bytes."""
    if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) or max_line_bytes < 1:
        raise DataError(f"max_line_bytes: {max_line_bytes!r} must be a positive integer")
    if len(raw) <= max_line_bytes:
        return
    # A run of more than max_line_bytes bytes without a newline, found at C speed.
    long = re.search(rb"[^\n]{%d}" % (max_line_bytes + 1), raw)
    if long is None:
        return
    line = raw.count(b"\n", 0, long.start()) + 1
    end = raw.find(b"\n", long.start())
    length = (len(raw) if end < 0 else end) - long.start()
    raise DataError(f"{path}, line {line}: {length:,} bytes ({format_size(length)}) of text on one line, more than "
                    f"the {format_size(max_line_bytes)} limit; split it into shorter lines or examples, or raise "
                    "the limit (--max-line-size, or read_examples(max_line_bytes=...))")


def split_lines(text: str) -> list[str]:
    """The lines of ``text``, ended by ``\\n`` only (``\\r\\n`` too); U+2028 and friends are text."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def detect_format(path: str | os.PathLike[str], text: str) -> str:
    """``"text"`` or ``"jsonl"``: from the extension, else from the first non-blank line."""
    suffix = Path(path).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    first = next((line for line in split_lines(text) if line.strip()), "")
    if first.lstrip().startswith(("{", "[")):
        try:
            if isinstance(parse_json(first), dict):
                return "jsonl"
        except JsonValueError:
            pass
        if one_document(text) is not None:
            return "jsonl"  # parse_jsonl explains that it is one document
    return "text"


def one_document(text: str) -> str | None:
    """What the file is when it is a single JSON document rather than JSON Lines, else None."""
    lines = [line for line in split_lines(text) if line.strip()]
    if not lines or not lines[0].lstrip().startswith(("[", "{")):
        return None
    try:
        parse_json(lines[0])
        if len(lines) > 1:
            return None  # lines of JSON: judged one by one
    except JsonValueError:
        pass
    try:
        value = parse_json(text)
    except JsonValueError:
        return None
    if isinstance(value, list):
        shown = f"{len(value):,} items"
        if value and isinstance(value[0], dict):
            shown += f", the first with fields {_fields(value[0])}"
        return f"one JSON array ({shown})"
    if isinstance(value, dict) and len(lines) > 1:
        return f"one JSON object spread over {len(lines)} lines (fields {_fields(value)})"
    return None


def parse_jsonl(path: str | os.PathLike[str], text: str) -> tuple[str, list[tuple[int, dict[str, str]]]]:
    """Parse JSONL into ``(kind, [(line number, record)])``, checking every line.

    ``kind`` is ``"jsonl-text"`` or ``"prompt-completion"``, decided by the first record;
    every record must then have the same fields, holding strings. All bad lines are
    collected and reported in one DataError; a file that is one JSON document (an array,
    or one object over several lines) is reported as that, in one line.
    """
    document = one_document(text)
    if document is not None:
        raise DataError(f"{path}: the file is {document}, not JSON Lines; {_ONE_PER_LINE}: e.g. convert it "
                        "with `jq -c '.[]' FILE > FILE.jsonl` and map its fields to \"text\" or "
                        "\"prompt\"/\"completion\"")
    records: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            value = parse_json(line)
        except JsonValueError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        if not isinstance(value, dict):
            problems.append(f"line {number}: expected a JSON object like {{\"text\": \"...\"}}, "
                            f"got {json_kind(value)}")
            continue
        records.append((number, value))
    kind, fields = _kind(records, problems)
    if kind is not None:
        for number, record in records:
            for field in fields:
                if field not in record:
                    problems.append(f"line {number}: missing field \"{field}\"; fields found: {_fields(record)}")
                elif not isinstance(record[field], str):
                    problems.append(f"line {number}: field \"{field}\" must be a string, "
                                    f"got {json_kind(record[field])}")
    if problems:
        problems.sort(key=lambda text: int(text.split(":")[0].split()[1]))  # by line number
        _raise(path, problems, _ONE_PER_LINE)
    assert kind is not None
    return kind, [(n, {f: r[f] for f in fields}) for n, r in records]


def _kind(records: list[tuple[int, dict[str, Any]]], problems: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """The format the first record sets, and its fields (problems recorded when none)."""
    if not records:
        if not problems:
            problems.append("line 1: no JSON objects in the file")
        return None, ()
    first_line, first = records[0]
    if "prompt" in first or "completion" in first:
        return "prompt-completion", ("prompt", "completion")
    if "text" in first:
        return "jsonl-text", ("text",)
    problems.append(f"line {first_line}: missing field \"text\" (or \"prompt\" and \"completion\"); "
                    f"fields found: {_fields(first)}")
    return None, ()


def _raise(path: str | os.PathLike[str], problems: list[str], fix: str) -> None:
    shown = problems[:_MAX_REPORTED]
    more = f"; and {len(problems) - len(shown)} more bad lines" if len(problems) > len(shown) else ""
    if len(problems) == 1:
        raise DataError(f"{path}, {problems[0]}; {fix}")
    raise DataError(f"{path}: {len(problems)} bad lines: " + "; ".join(shown) + more + f"; {fix}")


def _fields(record: dict[str, Any]) -> str:
    names = [f'"{k}"' for k in list(record)[:8]]
    return (", ".join(names) + (", ..." if len(record) > 8 else "")) if record else "none"


def json_kind(value: Any) -> str:
    """How a JSON value is described in messages: ``"a list"``, ``"a number"``, ..."""
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an object"
