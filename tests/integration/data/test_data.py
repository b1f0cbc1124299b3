"""Reading training data (lema.data.examples) and the byte tokenizer (lema.data.tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lema.data.examples import (
    IGNORE_INDEX,
    batches,
    collate,
    detect_format,
    read_examples,
    shipped_corpus,
)
from lema.data.tokenizer import build_byte_tokenizer, find_tokenizer_dir, load_tokenizer
from lema.errors import ConfigError, DataError
from tests.demo_models import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# -- the shipped corpus and the tokenizer --------------------------------------------------


def test_shipped_corpus_is_package_data_of_useful_size():
    text = shipped_corpus()
    assert 30_000 <= len(text.encode("utf-8")) <= 60_000
    assert text.count("\n\n") > 100  # many short paragraphs


def test_byte_tokenizer_round_trips_any_utf8_and_reloads_with_autotokenizer(tmp_path, tok):
    from transformers import AutoTokenizer

    text = "The train left at 8:10. Café, naïve, 東京, emoji 🚂!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text)["input_ids"] == ids
    assert load_tokenizer(tmp_path / "tok")(text)["input_ids"] == ids
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json")(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert find_tokenizer_dir(None, tmp_path, tmp_path / "tok") == tmp_path / "tok"


def test_byte_tokenizer_learns_merges_up_to_the_vocab_size():
    tok = build_byte_tokenizer(shipped_corpus(), vocab_size=400)
    assert len(tok) == 400
    assert len(tok(shipped_corpus()[:2000], add_special_tokens=False)["input_ids"]) < 1000  # merges compress


def test_tokenizer_errors_say_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        build_byte_tokenizer("some text", vocab_size=100)
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer files.*--tokenizer"):
        load_tokenizer(tmp_path / "empty")


# -- formats -------------------------------------------------------------------------------


def test_text_file_is_one_stream_cut_into_seq_blocks(tmp_path, tok):
    text = shipped_corpus()[:3000]
    data = read_examples(write(tmp_path / "a.txt", text), tok, seq=64)
    assert data.format == "text"
    stream = [t for e in data.examples for t in e.input_ids]
    assert stream == [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert all(len(e.input_ids) == 64 for e in data.examples[:-1])
    assert all(e.labels == e.input_ids for e in data.examples)


def test_jsonl_text_gives_one_example_per_line_with_eos(tmp_path, tok):
    lines = [{"text": "The rain fell."}, {"text": "The sun came out.", "id": 7}]
    path = write(tmp_path / "t.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = read_examples(path, tok, seq=64)
    assert data.format == "jsonl-text" and len(data.examples) == 2
    first = data.examples[0]
    assert list(first.input_ids) == tok("The rain fell.")["input_ids"] + [tok.eos_token_id]
    assert first.labels == first.input_ids


def test_prompt_completion_takes_loss_on_the_completion_only(tmp_path, tok):
    path = write(tmp_path / "p.jsonl", json.dumps({"prompt": "Q: 2+2?\nA:", "completion": " 4"}) + "\n")
    (ex,) = read_examples(path, tok, seq=64).examples
    prompt = tok("Q: 2+2?\nA:")["input_ids"]
    completion = tok(" 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(ex.input_ids) == prompt + completion
    assert list(ex.labels) == [IGNORE_INDEX] * len(prompt) + completion


def test_long_examples_are_truncated_and_counted_keeping_the_completion(tmp_path, tok):
    rows = [{"prompt": "word " * 100, "completion": " the end"}, {"prompt": "short", "completion": " yes"}]
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows))
    data = read_examples(path, tok, seq=16)
    assert data.n_truncated == 1
    long = data.examples[0]
    assert len(long.input_ids) == 16 and long.input_ids[-1] == tok.eos_token_id
    assert long.labels[-1] == tok.eos_token_id and long.labels[0] == IGNORE_INDEX


def test_format_is_detected_from_extension_then_first_line(tmp_path):
    assert detect_format("x.txt", '{"text": "a"}') == "text"
    assert detect_format("x.jsonl", "not json") == "jsonl"
    assert detect_format("x.data", '{"text": "a"}\n') == "jsonl"
    assert detect_format("x.data", "plain words\n") == "text"


# -- bad data: one DataError naming the file and line ----------------------------------------


@pytest.mark.parametrize("name,content,pattern", [
    ("empty.txt", "", r"empty\.txt: the file is empty"),
    ("blank.jsonl", "\n  \n", r"blank\.jsonl: the file is empty"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": "broken\n', r"bad\.jsonl, line 2: invalid JSON"),
    ("missing.jsonl", '{"text": "ok"}\n{"txt": "typo", "id": 1}\n',
     r'missing\.jsonl, line 2: missing field "text"; fields found: "txt", "id"'),
    ("nofield.jsonl", '{"body": "x"}\n', r'nofield\.jsonl, line 1: missing field "text" \(or "prompt" and "completion"\)'
                                         r'; fields found: "body"'),
    ("pc.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
     r'pc\.jsonl, line 2: missing field "completion"; fields found: "prompt"'),
    ("list.jsonl", '{"text": "a"}\n[1, 2]\n', r"list\.jsonl, line 2: expected a JSON object.*got a list"),
    ("num.jsonl", '{"text": 5}\n', r'num\.jsonl, line 1: field "text" must be a string, got a number'),
])
def test_bad_files_raise_one_data_error_naming_file_and_line(tmp_path, tok, name, content, pattern):
    with pytest.raises(DataError, match=pattern):
        read_examples(write(tmp_path / name, content), tok, seq=32)


def test_non_utf8_reports_line_and_byte_offset(tmp_path, tok):
    path = write(tmp_path / "latin1.txt", "first line\nsecond caf".encode() + b"\xe9\n")
    with pytest.raises(DataError, match=r"latin1\.txt, line 2: not valid UTF-8 \(byte 0xe9 at byte offset 21, "
                                        r"column 11\); re-save the file as UTF-8"):
        read_examples(path, tok, seq=32)


def test_several_bad_lines_are_collected_in_one_error(tmp_path, tok):
    content = "\n".join(['{"text": "ok"}', "{oops", '{"text": 1}', "[]", "{"] * 3)
    with pytest.raises(DataError, match=r"12 bad lines: line 2: invalid JSON.*line 3:.*and 7 more bad lines") as info:
        read_examples(write(tmp_path / "many.jsonl", content), tok, seq=32)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_data_error(tmp_path, tok):
    with pytest.raises(DataError, match="no such data file"):
        read_examples(tmp_path / "nope.txt", tok, seq=32)


# -- batching ------------------------------------------------------------------------------


def test_collate_right_pads_with_ignored_labels(tok):
    from lema.data.examples import Example

    batch = collate([Example((1, 5, 6), (1, 5, 6)), Example((1, 7), (IGNORE_INDEX, 7))], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[1, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def _examples(n: int):
    from lema.data.examples import Example

    return [Example((1, i + 3), (1, i + 3)) for i in range(n)]


def test_batches_are_seeded_cover_every_example_each_epoch_and_resume_by_skipping():
    examples = _examples(10)
    run = [b["input_ids"][:, 1].tolist() for b in batches(examples, 3, 0, seed=4, epochs=2)]
    assert len(run) == 8  # 4 per epoch, the last one smaller
    assert sorted(sum(run[:4], [])) == list(range(3, 13)) == sorted(sum(run[4:], []))
    assert run == [b["input_ids"][:, 1].tolist() for b in batches(examples, 3, 0, seed=4, epochs=2)]
    assert run != [b["input_ids"][:, 1].tolist() for b in batches(examples, 3, 0, seed=5, epochs=2)]
    for k in range(9):
        resumed = [b["input_ids"][:, 1].tolist() for b in batches(examples, 3, 0, seed=4, epochs=2, skip=k)]
        assert resumed == run[k:]


def test_endless_stream_keeps_going_across_epochs():
    stream = batches(_examples(4), 4, 0, seed=0, epochs=None)
    firsts = [next(stream)["input_ids"] for _ in range(5)]
    assert all(isinstance(t, torch.Tensor) and t.shape == (4, 2) for t in firsts)
