"""Preference rows: TRL's formats, the implicit prompt, and bad rows reported by line."""

from __future__ import annotations

import json

import pytest

from lema.data.preference import collate_pairs, extract_prompt, load_preference
from lema.errors import DataError
from tests.chat_models import ANSWER, chat_tokenizer


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_rows_are_named_by_line(tmp_path):
    rows = [{"prompt": "apple river ", "chosen": ANSWER, "rejected": "green stone"},
            {"prompt": "apple river ", "chosen": ANSWER},
            {"prompt": "apple river ", "chosen": "", "rejected": "green"},
            {"prompt": "apple river ", "chosen": "green", "rejected": "green"}]
    with pytest.raises(DataError) as err:
        load_preference(_write(tmp_path / "p.jsonl", rows), chat_tokenizer(), method="dpo", seq=32)
    text = str(err.value)
    assert "line 2" in text and "'rejected'" in text
    assert "line 3" in text and "'chosen'" in text
    assert "line 4" in text and "the same answer" in text
    assert "line 1" not in text and "\n" not in text


def test_prompt_that_fills_seq_is_refused(tmp_path):
    rows = [{"prompt": "apple river stone cloud green quick ", "chosen": ANSWER, "rejected": "green stone"}]
    with pytest.raises(DataError, match="line 1.*--seq 4"):
        load_preference(_write(tmp_path / "p.jsonl", rows), chat_tokenizer(), method="dpo", seq=4)


def test_implicit_prompt_and_conversations(tmp_path):
    user = {"role": "user", "content": "apple river"}
    rows = [{"chosen": [user, {"role": "assistant", "content": ANSWER}],
             "rejected": [user, {"role": "assistant", "content": "green stone"}]}]
    prompt, chosen, rejected = extract_prompt(rows[0]["chosen"], rows[0]["rejected"])
    assert prompt == [user] and chosen[0]["content"] == ANSWER
    tok = chat_tokenizer()
    (pair,) = load_preference(_write(tmp_path / "c.jsonl", rows), tok, method="dpo", seq=64)
    rendered = tok.apply_chat_template([user], tokenize=True, return_dict=True, add_generation_prompt=True)
    assert list(pair.prompt) == list(rendered["input_ids"])  # the generation prompt ends the prompt
    batch = collate_pairs([pair, pair], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # [chosen, chosen, rejected, rejected]: pairs stay together
    assert (batch["labels"][:, :len(pair.prompt)] == -100).all()


def test_text_answers_get_eos_as_text(tmp_path):
    tok = chat_tokenizer()
    rows = [{"prompt": "apple river ", "chosen": ANSWER, "rejected": "green stone"}]
    (pair,) = load_preference(_write(tmp_path / "t.jsonl", rows), tok, method="dpo", seq=64)
    assert pair.chosen[-1] == tok.eos_token_id and pair.rejected[-1] == tok.eos_token_id
