"""Byte sizes: parsing "8G" and friends, formatting for humans."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lema.domain.units import format_size, parse_size
from lema.errors import ConfigError

GiB = 1024**3


@pytest.mark.parametrize("text, expected", [
    ("8G", 8 * GiB), ("8GB", 8 * GiB), ("8GiB", 8 * GiB), ("8g", 8 * GiB), (" 8 G ", 8 * GiB),
    ("7.5GiB", int(7.5 * GiB)), ("512M", 512 * 1024**2), ("1.5T", int(1.5 * 1024**4)), ("1024", 1024),
    ("1K", 1024), ("2e3", 2000), ("1P", 1024**5), (4096, 4096), (1.5, 2),
])
def test_parse_size_accepts_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "   ", "lots", "0", "-1", "nan", "inf", "8X", "G", "8 GiBs", "0.1", True, None,
                                 float("nan"), float("inf"), -5, 0])
def test_parse_size_rejects_non_sizes_with_config_error(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_parse_size_error_names_the_field():
    with pytest.raises(ConfigError, match="--vram"):
        parse_size("lots", field="--vram")


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_size("nope")


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (404766720, "386.0 MiB"),
                                     (8 * GiB, "8.0 GiB"), (-1024, "-1.0 KiB"), (3 * 1024**5, "3.0 PiB"),
                                     (5000 * 1024**5, "5000.0 PiB")])
def test_format_size_uses_binary_units_and_one_decimal(n, text):
    assert format_size(n) == text


@given(st.integers(min_value=1, max_value=2**62))
def test_plain_integer_strings_round_trip_exactly(n):
    assert parse_size(str(n)) == n


@given(st.integers(min_value=1024, max_value=2**60))
def test_format_then_parse_is_close(n):
    """format rounds to one decimal of its unit, so the round trip is within half a tenth of it."""
    back = parse_size(format_size(n).replace(" ", ""))
    unit = 1024 ** int(math.log(n, 1024) + 1e-12)
    assert abs(back - n) <= 0.05 * unit + 1
    assert abs(back - n) / n <= 0.05 / 1.0 + 1e-9
