"""Reading data files: lines end at \\n only, long lines and JSON documents are refused by name."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.data.examples import read_examples
from lema.data.text_files import parse_jsonl, read_text
from lema.errors import DataError
from tests.demo_models import byte_tokenizer

BAD = settings.get_profile("bad-inputs")
# Characters str.splitlines() treats as line ends besides \n (and \r, which JSON escapes anyway).
LINE_LIKE = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e"
texts = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(LINE_LIKE), max_size=30)


def write(name: str, content: str | bytes) -> Path:
    path = Path(tempfile.mkdtemp()) / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


class NoTokenizer:
    """A tokenizer that must not be reached: the file is refused before tokenizing."""

    eos_token_id = 2

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized a file that should have been refused first")


@BAD
@given(st.lists(texts, min_size=1, max_size=8))
def test_jsonl_records_round_trip_whatever_line_like_characters_they_hold(values):
    """Property: U+2028, U+0085, form feeds... inside a record are text, not line ends."""
    lines = [json.dumps({"text": v}, ensure_ascii=False) for v in values]
    kind, records = parse_jsonl("x.jsonl", "\n".join(lines) + "\n")
    assert kind == "jsonl-text"
    assert [(n, r["text"]) for n, r in records] == list(zip(range(1, len(values) + 1), values))


@BAD
@given(st.lists(st.text(alphabet="abc \n", max_size=40), min_size=1, max_size=6), st.integers(8, 64), st.data())
def test_a_line_over_the_cap_is_refused_by_number_before_tokenizing(lines, cap, data):
    """Property: the first line longer than the cap is named, and nothing is tokenized."""
    lines = [line.replace("\n", " ") or "x" for line in lines]
    where = data.draw(st.integers(0, len(lines) - 1))
    lines[where] = "y" * (cap + data.draw(st.integers(1, 100)))
    first = next(i for i, line in enumerate(lines) if len(line.encode()) > cap) + 1
    path = write("data.txt", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"line {first}: [\d,]+ bytes .* of text on one line, more than the {cap} B"):
        read_examples(path, NoTokenizer(), seq=16, max_line_bytes=cap)


@BAD
@given(st.lists(st.dictionaries(st.sampled_from(["instruction", "input", "output", "text"]), st.text(max_size=8),
                                min_size=1), min_size=1, max_size=50), st.booleans(), st.sampled_from([".json", ".jsonl"]))
def test_a_json_array_file_reads_as_its_items_and_never_as_bad_lines(rows, indent, suffix):
    """Property: an Alpaca-style array is one JSON array whose items are the records (issue 17):
    it gives the examples the same rows as JSON Lines give, or the same problems, named by
    item and line; never "N bad lines" of JSON syntax."""
    tok = byte_tokenizer()
    path = write("data" + suffix, json.dumps(rows, indent=2 if indent else None))
    lines = write("data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    try:
        expected = [(e.input_ids, e.labels) for e in read_examples(lines, tok, seq=64).examples]
    except DataError as exc:
        with pytest.raises(DataError) as info:
            read_examples(path, tok, seq=64)
        assert "\n" not in str(info.value) and "invalid JSON" not in str(info.value)
        assert _problems(str(info.value)) == _problems(str(exc))  # the same problems, row by row
        assert "item " in str(info.value)
        return
    assert [(e.input_ids, e.labels) for e in read_examples(path, tok, seq=64).examples] == expected


def _problems(message: str) -> list[str]:
    """The problems an error lists, without their locations ("line 3: " or "item 3 (line 9): ")."""
    import re

    return re.findall(r"(?:line \d+|item \d+ \(line \d+\)): ([^;]+)", message)


@BAD
@given(st.lists(st.text(alphabet="abc", min_size=1, max_size=5), min_size=2, max_size=6), st.data())
def test_one_bad_line_among_good_ones_is_named_by_number(values, data):
    """Property: whichever line is broken (not JSON, not an object, wrong field, a surrogate), it is named."""
    lines = [json.dumps({"text": v}) for v in values]
    where = data.draw(st.integers(1, len(lines) - 1))  # line 1 stays good: it sets the format
    bad, reason = data.draw(st.sampled_from([
        ('{"text": ', "invalid JSON"), ("[1, 2]", "expected a JSON object"), ('{"text": 5}', "must be a string"),
        ('{"body": "x"}', 'missing field "text"'), ('{"text": "\\udc80"}', "unpaired"),
        ("[" * 300, "nested deeper")]))
    lines[where] = bad
    path = write("data.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"line {where + 1}: .*{reason}"):
        read_examples(path, NoTokenizer(), seq=16)


def test_a_pretty_printed_object_is_named_as_one_document(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"text": "hello", "meta": {"a": 1}}, indent=2))
    with pytest.raises(DataError, match="one JSON object spread over 6 lines"):
        read_examples(path, NoTokenizer(), seq=16)


def test_crlf_lines_and_u2028_inside_a_record_read_as_one_record_each(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes('{"text": "a\u2028b"}\r\n{"text": "c\u0085d"}\r\n'.encode())
    data = read_examples(path, byte_tokenizer(), seq=32)
    tok = byte_tokenizer()
    assert [tok.decode(e.input_ids, skip_special_tokens=True) for e in data.examples] == ["a\u2028b", "c\u0085d"]


def test_the_default_cap_is_one_mebibyte(tmp_path):
    ok = write("ok.txt", "z" * (1 << 20) + "\n")
    assert read_text(ok).startswith("z")
    with pytest.raises(DataError, match="line 1: 1,048,577 bytes"):
        read_text(write("big.txt", "z" * ((1 << 20) + 1)))
