"""JSON text from outside (headers, configs, indexes, data lines, checkpoints) -> values, safely.

``json.loads`` alone lets bad input escape as the wrong exception: nesting deeper than
the interpreter's recursion limit raises ``RecursionError``, an integer literal of more
than 4,300 digits a plain ``ValueError``, and ``\\ud800`` escapes give strings with lone
surrogates that later fail deep inside a tokenizer or a file write. :func:`parse_json`
turns each of these into one :class:`JsonValueError` that says what is wrong, so every
reader reports it as its own LEMA error. Pure: text in, values out.

Example:
    >>> parse_json('{"a": [1, 2]}')
    {'a': [1, 2]}
    >>> parse_json("[" * 100_000)
    Traceback (most recent call last):
    ...
    lema.domain.json_values.JsonValueError: JSON nested deeper than 200 levels
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Real configs, headers and data lines nest a handful of levels; 200 leaves room for any
# honest document and stays far below the interpreter's recursion limit.
MAX_DEPTH = 200
# Escapes first (a backslash and the character after it), then strings: two plain
# character-class runs. A repeated group such as ``"(?:[^"\\]|\\.)*"`` keeps one backtracking
# frame per character: a 60 MB string in a header cost gigabytes and a minute.
_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonValueError(ValueError):
    """Text that is not JSON LEMA can use (invalid, too deep, a number out of range)."""


def parse_json(text: str | bytes, *, max_depth: int = MAX_DEPTH, allow_surrogates: bool = False) -> Any:
    """Parse JSON text, refusing what ``json.loads`` accepts but LEMA cannot use.

    Args:
        text: the JSON text (bytes are decoded as UTF-8).
        max_depth: the deepest nesting of arrays and objects accepted.
        allow_surrogates: keep strings holding unpaired UTF-16 surrogates (``"\\ud800"``),
            which no UTF-8 file or tokenizer can hold; refused by default.

    Returns:
        The value (Python's ``NaN`` and ``Infinity`` literals included: the fields' own
        checks refuse them where a finite number is needed).

    Raises:
        JsonValueError: invalid JSON (with the line and column), nesting deeper than
            ``max_depth``, an integer of more than 4,300 digits, text that is not UTF-8,
            or an unpaired surrogate.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonValueError(f"not UTF-8 text (byte 0x{text[exc.start]:02x} at offset {exc.start})") from None
    if not allow_surrogates and not is_text(text):
        raise JsonValueError("holds an unpaired UTF-16 surrogate, which is not text; re-save it as UTF-8")
    if nesting_depth(text) > max_depth:
        raise JsonValueError(f"JSON nested deeper than {max_depth} levels")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno} column {exc.colno}"
        raise JsonValueError(f"invalid JSON ({exc.msg} at {where})") from None
    except RecursionError:  # nesting_depth already bounds this; a last guard
        raise JsonValueError(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise JsonValueError(f"a number is out of range ({str(exc).split(';')[0]})") from None
    # Only a \uD800-\uDFFF escape can put a surrogate into a value parsed from UTF-8 text.
    if not allow_surrogates and _SURROGATE_ESCAPE.search(text):
        bad = find_surrogate(value)
        if bad is not None:
            raise JsonValueError(f"{bad} holds an unpaired UTF-16 surrogate escape (like \\ud800), "
                                 "which is not text; fix the escape or remove it")
    return value


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings, without recursion.

    Strings are removed and the brackets kept at C speed, so only the brackets are
    walked in Python (a header's few per tensor, never its names).
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    if len(brackets) <= 1:
        return len(brackets)
    depth = deepest = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def find_surrogate(value: Any, where: str = "value") -> str | None:
    """Where in ``value`` (a parsed JSON value) a string holds an unpaired surrogate, or None."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            if not is_text(item):
                return at
        elif isinstance(item, dict):
            for key, child in item.items():
                if not is_text(key):
                    return f"{at} key {key!r}"
                stack.append((child, f'field "{key}"' if at == where else f'{at}."{key}"'))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{i}]") for i, child in enumerate(item))
    return None


def is_text(text: str) -> bool:
    """True when ``text`` can be written as UTF-8 (no unpaired surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_finite_number(value: Any) -> bool:
    """True for an int or a finite float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
