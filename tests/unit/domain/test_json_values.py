"""JSON from outside: parse_json gives json.loads' value or one JsonValueError, never another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lema.domain.json_values import MAX_DEPTH, JsonValueError, nesting_depth, parse_json

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@given(values)
def test_any_json_value_round_trips(value):
    assert parse_json(json.dumps(value)) == value
    assert parse_json(json.dumps(value).encode("utf-8")) == value


@given(st.text(max_size=200))
def test_any_text_is_a_value_or_a_json_value_error(text):
    """Property: json.loads' value when it has one (within the depth), else JsonValueError."""
    try:
        expected = json.loads(text)
    except (ValueError, RecursionError):
        expected = JsonValueError
    if expected is not JsonValueError and nesting_depth(text) > MAX_DEPTH:
        expected = JsonValueError
    if expected is JsonValueError:
        with pytest.raises(JsonValueError):
            parse_json(text)
    else:
        assert json.dumps(parse_json(text)) == json.dumps(expected)  # compared as text: NaN != NaN


@given(st.integers(MAX_DEPTH + 1, 50_000), st.sampled_from(["[", '{"a":']), st.text(max_size=20))
def test_nesting_deeper_than_the_bound_is_refused_by_name(depth, opener, tail):
    """Property: any text nesting deeper than MAX_DEPTH is one JsonValueError, never RecursionError."""
    closer = "]" if opener == "[" else "}"
    with pytest.raises(JsonValueError, match="nested deeper than"):
        parse_json(opener * depth + "1" + closer * depth + tail)


@given(st.dictionaries(st.text(alphabet="abcxyz", min_size=1, max_size=5), st.text(max_size=5), min_size=1),
       st.integers(0xD800, 0xDFFF), st.data())
def test_an_unpaired_surrogate_escape_is_refused_naming_its_field(record, code, data):
    """Property: a \\uD800-\\uDFFF escape without its pair is a JsonValueError naming the field."""
    field = data.draw(st.sampled_from(sorted(record)))
    text = json.dumps(record).replace(json.dumps(field) + ": " + json.dumps(record[field]),
                                      json.dumps(field) + f': "x\\u{code:04x}y"', 1)
    with pytest.raises(JsonValueError, match=rf'field "{field}" holds an unpaired'):
        parse_json(text)


def test_integers_beyond_pythons_digit_limit_are_out_of_range():
    with pytest.raises(JsonValueError, match="out of range"):
        parse_json("[" + "9" * 5000 + "]")


def test_a_paired_surrogate_escape_is_text():
    assert parse_json('"\\ud83d\\ude00"') == "\U0001F600"
