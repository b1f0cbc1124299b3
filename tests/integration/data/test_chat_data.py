"""Chat data: assistant masks (transformers' generation marks; prefix by prefix without
them), the chat formats (messages, ShareGPT, Alpaca, conversational prompt/completion),
no duplicated BOS, and line-precise errors on bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lema.data import chat
from lema.data.examples import IGNORE_INDEX, read_examples
from lema.errors import DataError
from tests.chat_models import ANSWER, MARKED_TEMPLATE, TEMPLATE, chat_tokenizer, conversations

MULTI_TURN = [{"role": "system", "content": "you are a helpful assistant"},
              {"role": "user", "content": "apple river"},
              {"role": "assistant", "content": "i always answer"},
              {"role": "tool", "content": "stone cloud"},
              {"role": "user", "content": "green quick table"},
              {"role": "assistant", "content": "with this same short sentence"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def masks_of(store) -> list[list[int]]:
    return [[int(label != IGNORE_INDEX) for label in e.labels] for e in store]


def test_marked_template_mask_is_transformers_assistant_mask(tmp_path):
    """Through the whole pipeline (file -> store -> labels), a template with {% generation %}
    marks gives exactly apply_chat_template(..., return_assistant_tokens_mask=True)."""
    tok = chat_tokenizer(MARKED_TEMPLATE)
    convs = conversations(5, seed=1) + [MULTI_TURN]
    data = read_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs]), tok, seq=128)
    assert data.format == "messages"
    for conv, example in zip(convs, data.examples):
        ref = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(example.input_ids) == list(ref["input_ids"])
        assert [int(t != IGNORE_INDEX) for t in example.labels] == list(ref["assistant_masks"])
        assert sum(ref["assistant_masks"]) > 0


def test_prefix_by_prefix_mask_equals_the_generation_marks_of_the_same_rendering():
    """TEMPLATE renders exactly what MARKED_TEMPLATE renders, without marks: the spans found
    by rendering prefix by prefix give transformers' mask of the marked template."""
    plain, marked = chat_tokenizer(TEMPLATE), chat_tokenizer(MARKED_TEMPLATE)
    convs = conversations(6, seed=2) + [MULTI_TURN]
    ours = chat.render_batch(plain, convs, TEMPLATE)
    for conv, (ids, mask) in zip(convs, ours):
        assert chat.render_text(plain, conv, TEMPLATE) == chat.render_text(marked, conv, MARKED_TEMPLATE)
        ref = marked.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == list(ref["input_ids"]) and mask == list(ref["assistant_masks"])


def test_prefix_by_prefix_mask_hand_checked():
    """A two-turn conversation, mask written out by hand: the loss is on each assistant
    reply and the end-of-turn token after it, nowhere else."""
    tok = chat_tokenizer(TEMPLATE)
    (ids, mask), = chat.render_batch(tok, [MULTI_TURN[1:]], TEMPLATE)
    tokens = tok.convert_ids_to_tokens(ids)
    expected = [("<s>", 0), ("<|user|>", 0), ("apple", 0), ("river", 0), ("<|end|>", 0),
                ("<|assistant|>", 0), ("i", 1), ("always", 1), ("answer", 1), ("<|end|>", 1),
                ("<|tool|>", 0), ("stone", 0), ("cloud", 0), ("<|end|>", 0),
                ("<|user|>", 0), ("green", 0), ("quick", 0), ("table", 0), ("<|end|>", 0),
                ("<|assistant|>", 0), ("with", 1), ("this", 1), ("same", 1), ("short", 1), ("sentence", 1),
                ("<|end|>", 1)]
    assert list(zip(tokens, mask)) == expected


def test_template_bos_is_not_doubled():
    """The byte tokenizer adds BOS by itself; a template that writes {{ bos_token }} gets one BOS."""
    from tests.demo_models import byte_tokenizer

    tok = byte_tokenizer()
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # it would add one
    (ids, mask), = chat.render_batch(tok, [[{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]], template)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # no generation prompt in this template: the span is the whole assistant message
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "assistant: hello<|eos|>"


@pytest.mark.parametrize("form", ["sharegpt", "alpaca", "pc-conversational"])
def test_other_chat_forms_give_the_messages_tokens_and_mask(tmp_path, form):
    tok = chat_tokenizer(TEMPLATE)
    convs = conversations(4, seed=3)
    reference = read_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": c} for c in convs]), tok, seq=128)
    if form == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                                                      for m in c[1:]], "system": c[0]["content"]}
                                                   for c in convs])
    elif form == "alpaca":
        path = tmp_path / "a.json"
        path.write_text(json.dumps([{"instruction": c[1]["content"], "input": "", "output": c[2]["content"],
                                     "system": c[0]["content"]} for c in convs], indent=2), encoding="utf-8")
    else:
        path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": c[:2], "completion": c[2:]} for c in convs])
    data = read_examples(path, tok, seq=128)
    assert data.format == {"sharegpt": "sharegpt", "alpaca": "alpaca", "pc-conversational": "prompt-completion"}[form]
    assert [e.input_ids for e in data.examples] == [e.input_ids for e in reference.examples]
    assert [e.labels for e in data.examples] == [e.labels for e in reference.examples]


def test_alpaca_without_a_chat_template_uses_the_alpaca_prompt(tmp_path):
    from tests.demo_models import byte_tokenizer

    tok = byte_tokenizer()
    assert not tok.chat_template
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Add 2 and 2.", "input": "", "output": "4"}]), encoding="utf-8")
    (ex,) = read_examples(path, tok, seq=256).examples
    text = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX], skip_special_tokens=True)
    assert text.startswith("Below is an instruction") and text.endswith("### Response:\n")
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=True) == "4"


def test_a_chat_format_without_a_template_says_to_pass_one(tmp_path):
    from tests.demo_models import byte_tokenizer

    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversations(1)[0]}])
    with pytest.raises(DataError, match=r"no chat template; pass one with --chat-template"):
        read_examples(path, byte_tokenizer(), seq=64)
    data = read_examples(path, byte_tokenizer(), seq=256, chat_template="chatml")
    assert data.format == "messages" and data.n_target_tokens > 0


def test_a_json_array_is_read_as_one_with_item_lines_in_errors(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"instruction": "e", "output": 5}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_examples(path, chat_tokenizer(), seq=64)
    message = str(info.value)
    assert message.startswith(f"{path}: 2 bad lines: item 2 (line 6): missing field \"output\"")
    assert "item 3 (line 9): field \"output\" must be a string, got a number" in message
    assert "\n" not in message


@pytest.mark.parametrize("row,pattern", [
    ({"messages": [{"role": "usr", "content": "x"}]}, r'line 2: "messages" message 1: "role" \'usr\' is not one of'),
    ({"messages": "hello"}, r'line 2: field "messages" must be a non-empty list of messages, got a string'),
    ({"messages": [{"role": "user", "content": "x"}]}, r'line 2: "messages" has no assistant message'),
    ({"messages": [{"role": "assistant", "content": 3}]}, r'line 2: "messages" message 1: "content" must be a string'),
    ({"text": "no messages"}, r'line 2: missing field "messages"; fields found: "text"'),
])
def test_bad_chat_rows_are_line_precise(tmp_path, row, pattern):
    good = {"messages": conversations(1)[0]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, row])
    with pytest.raises(DataError, match=pattern):
        read_examples(path, chat_tokenizer(), seq=64)


def test_an_unpaired_surrogate_is_a_line_precise_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: field \"text\" holds an unpaired UTF-16 surrogate"):
        read_examples(path, chat_tokenizer(), seq=64)


def test_conversations_longer_than_seq_are_cut_and_ones_without_a_target_dropped(tmp_path):
    tok = chat_tokenizer(TEMPLATE)
    long_user = {"role": "user", "content": " ".join(["apple"] * 80)}
    rows = [{"messages": conversations(1)[0]}, {"messages": [long_user, {"role": "assistant", "content": ANSWER}]}]
    data = read_examples(write_jsonl(tmp_path / "c.jsonl", rows), tok, seq=40)
    assert len(data.examples) == 1  # the second has no assistant token within 40
    assert data.examples.meta["dropped"] == 1
