"""Byte sizes: parse "8G" / "7.5GiB" / "512M" and format them for humans.

Binary units throughout, as GPU memory is sold: ``8G``, ``8GB``, ``8GiB`` and ``8g`` all
mean 8 GiB = 8 * 2**30 bytes. A plain number is a count of bytes.

Example:
    >>> parse_size("8G")
    8589934592
    >>> format_size(404766720)
    '386.0 MiB'
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from lema.errors import ConfigError

_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGTPkmgtp]?)(?:i?[Bb])?\s*$")
_SUFFIXES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(value: str | int | float, *, field: str = "size") -> int:
    """Parse a byte size into an integer number of bytes.

    Args:
        value: ``"8G"``, ``"8GB"``, ``"8GiB"``, ``"512M"``, ``"1.5T"``, ``"1024"`` or an int.
        field: the name shown in the error message (e.g. ``"--vram"``).

    Returns:
        The size in bytes, a positive integer.

    Raises:
        ConfigError: for zero, negative, NaN, infinite, empty or unparsable values.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{field}: {value!r} is not a byte size; use e.g. 8G or 512M")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{field}: {value!r} is not a finite size; use e.g. 8G")
        number, exponent = Fraction(value), 0
        text = repr(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise ConfigError(
                f"{field}: {value!r} is not a byte size; use a number with an optional unit "
                "K, M, G or T (binary: 8G = 8 GiB), e.g. 8G, 7.5GiB, 512M"
            )
        # Exact arithmetic: a float would round byte counts above 2**53. A huge exponent
        # ("1e999999") is refused before the big integer is built.
        _, _, power = match.group(1).lower().partition("e")
        if power and abs(int(power)) > 40:
            raise ConfigError(f"{field}: {value!r} is out of range; use e.g. 8G")
        number, exponent = Fraction(match.group(1)), _UNITS[match.group(2).upper()]
        text = repr(value)
    else:
        raise ConfigError(f"{field}: {value!r} is not a byte size; use e.g. 8G or 512M")
    result = number * (1024**exponent)
    if result > 2**80:
        raise ConfigError(f"{field}: {text} is larger than any memory ({format_size(2**80)}); use e.g. 8G")
    if result < 1:
        raise ConfigError(f"{field}: {text} must be at least 1 byte; use e.g. 8G")
    return int(round(result))


def format_size(nbytes: int) -> str:
    """Format a byte count with a binary unit and one decimal, e.g. ``'7.9 GiB'``."""
    if nbytes < 0:
        return "-" + format_size(-nbytes)
    value = float(nbytes)
    for suffix in _SUFFIXES:
        if value < 1024 or suffix == _SUFFIXES[-1]:
            return f"{int(value)} B" if suffix == "B" else f"{value:.1f} {suffix}"
        value /= 1024
    raise AssertionError("unreachable")
