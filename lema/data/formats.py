"""Data formats, detected from a record's fields (or forced with ``--format``).

=====================  =============================================  =========================
format                 fields                                         loss on
=====================  =============================================  =========================
``text``               ``text``                                       every token
``prompt-completion``  ``prompt``, ``completion`` (strings, or lists  the completion
                       of messages: TRL's conversational form)
``messages``           ``messages``: ``[{"role", "content"}, ...]``   the assistant turns
                       with roles system / user / assistant / tool
``sharegpt``           ``conversations``: ``[{"from", "value"}]``     the assistant (``gpt``)
                       (``human``/``gpt``/``system``/``tool``)         turns
``alpaca``             ``instruction``, ``output`` (``input``,        the output
                       ``system`` optional)
=====================  =============================================  =========================

Each record becomes a :class:`Sample`: plain text, a prompt and a completion, or a
conversation (a list of ``{"role", "content"}`` messages) that :mod:`lema.data.chat`
renders with the tokenizer's chat template. A bad record adds one problem naming its
line to :class:`~lema.data.records.Problems` and is skipped.
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs

from lema.data.records import Problems, Record, json_kind
from lema.errors import DataError

TEXT, COMPLETION, MESSAGES, SHAREGPT, ALPACA = "text", "prompt-completion", "messages", "sharegpt", "alpaca"
FORMATS = (TEXT, COMPLETION, MESSAGES, SHAREGPT, ALPACA)
CHAT_FORMATS = (MESSAGES, SHAREGPT)
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "system": "system",
                   "tool": "tool", "function": "tool", "function_call": "assistant", "observation": "tool"}
FIX = ('each record needs a "text" field, "prompt" and "completion", "messages" (chat), "conversations" '
       '(ShareGPT) or "instruction" and "output" (Alpaca); or choose the format with --format')
_MAP = ("map the data's own field names with --messages-field, --role-key, --content-key, --roles, --text-field, "
        "--prompt-field or --completion-field")


def fix(given: str | None) -> str:
    """What to do about records that do not fit: the format's fields (``given``: the ``--format``
    the user chose, so it is not offered again), or a mapping of the data's names."""
    if given is None:
        return f"{FIX}, or {_MAP}"
    return f"the records of --format {given} need its fields; {_MAP}"
# The prompt Stanford Alpaca was trained with, for tokenizers without a chat template.
ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


@attrs.frozen
class Sample:
    """One example before tokenization.

    Attributes:
        kind: ``"text"``, ``"completion"`` or ``"chat"``.
        text: the text (``"text"``) or the prompt (``"completion"``).
        completion: the completion (``"completion"``).
        messages: the conversation (``"chat"``): dicts with ``role`` and ``content``.
        line: the record's line (or row) number, for sorting problems.
        where: the record's location in messages (``"line 3"``, ``"row 7"``).
    """

    kind: str
    text: str = ""
    completion: str = ""
    messages: tuple[dict[str, Any], ...] = ()
    line: int = 0
    where: str = ""


def detect(fields: Iterable[str]) -> str | None:
    """The format a record's (or a table's) fields name, or None."""
    names = set(fields)
    if "messages" in names:
        return MESSAGES
    if "conversations" in names:
        return SHAREGPT
    if "instruction" in names and "output" in names:
        return ALPACA
    if "prompt" in names or "completion" in names:
        return COMPLETION
    if "text" in names:
        return TEXT
    return None


def check_format(name: str | None) -> str | None:
    """``--format``: None (detect) or one of :data:`FORMATS`."""
    if name is None or name == "auto":
        return None
    if name not in FORMATS:
        raise DataError(f"--format: {name!r} is not a data format; use one of {', '.join(FORMATS)} (or auto)")
    return name


def fields_text(record: dict[str, Any]) -> str:
    return ", ".join(f'"{k}"' for k in record) if record else "none"


def undetected(record: Record) -> str:
    """The problem of a first record whose fields name no format."""
    return (f'{record.where}: missing field "text" (or "prompt" and "completion"); '
            f"fields found: {fields_text(record.fields)}")


def to_sample(fmt: str, record: Record, problems: Problems, chat_available: bool = True) -> Sample | None:
    """Convert one record; a problem (and None) for a record that does not fit ``fmt``.

    ``chat_available``: the tokenizer has a chat template, so Alpaca records become
    conversations (otherwise the Alpaca prompt text).
    """
    f, where = record.fields, record.where
    bad = _Bad(problems, record)
    if fmt == TEXT:
        text = bad.string(f, "text")
        return None if text is None else Sample(TEXT, text=text, line=record.line, where=where)
    if fmt == COMPLETION:
        return _completion(f, bad, record)
    if fmt == ALPACA:
        instruction, output = bad.string(f, "instruction"), bad.string(f, "output")
        extra = bad.string(f, "input", required=False) or ""
        system = bad.string(f, "system", required=False)
        if instruction is None or output is None or extra is None:
            return None
        if not output.strip():
            return bad.fail('"output" is empty; there is nothing to learn from this record')
        if not chat_available:
            prompt = ALPACA_PROMPT.format(with_input=", paired with an input that provides further context"
                                          if extra.strip() else "", instruction=instruction,
                                          input_block=f"### Input:\n{extra}\n\n" if extra.strip() else "")
            return Sample(COMPLETION, text=prompt, completion=output, line=record.line, where=where)
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Sample("chat", messages=tuple(messages), line=record.line, where=where)
    if fmt in (MESSAGES, SHAREGPT):
        key = "messages" if fmt == MESSAGES else "conversations"
        if key not in f:
            return bad.fail(f'missing field "{key}"; fields found: {fields_text(f)}')
        messages = _messages(f[key], key, fmt == SHAREGPT, bad)
        if messages is None:
            return None
        system = f.get("system") if fmt == SHAREGPT else None
        if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return Sample("chat", messages=tuple(messages), line=record.line, where=where)
    raise DataError(f"internal: unknown format {fmt!r} at {where}")


def _completion(f: dict[str, Any], bad: "_Bad", record: Record) -> Sample | None:
    where = record.where
    prompt, completion = f.get("prompt"), f.get("completion")
    if _conversational(prompt) or _conversational(completion):  # TRL's conversational prompt/completion
        first = _messages(prompt if prompt is not None else [], "prompt", False, bad, need_assistant=False)
        second = _messages(completion, "completion", False, bad) if completion is not None else None
        if completion is None:
            return bad.fail(f'missing field "completion"; fields found: {fields_text(f)}')
        if first is None or second is None:
            return None
        return Sample("chat", messages=tuple(first + second), line=record.line, where=where)
    p, c = bad.string(f, "prompt"), bad.string(f, "completion")
    if p is None or c is None:
        return None
    if not c.strip():
        return bad.fail('"completion" is empty; there is nothing to learn from this line: give it a completion '
                        "or remove the line")
    return Sample(COMPLETION, text=p, completion=c, line=record.line, where=where)


def _conversational(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _messages(value: Any, key: str, sharegpt: bool, bad: "_Bad", need_assistant: bool = True
              ) -> list[dict[str, Any]] | None:
    if not isinstance(value, list) or not value:
        return bad.fail(f'field "{key}" must be a non-empty list of messages, got '
                        f"{'an empty list' if value == [] else json_kind(value)}")
    out = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return bad.fail(f'"{key}" message {i} must be an object, got {json_kind(message)}')
        role_key, content_key = ("from", "value") if sharegpt and "from" in message else ("role", "content")
        role = message.get(role_key)
        if sharegpt and role_key == "from":
            role = _SHAREGPT_ROLES.get(role if isinstance(role, str) else "", None)
            if role is None:
                return bad.fail(f'"{key}" message {i}: "from" {message.get("from")!r} is not one of '
                                f"{', '.join(sorted(set(_SHAREGPT_ROLES)))}")
        elif role not in ROLES:
            return bad.fail(f'"{key}" message {i}: "{role_key}" {role!r} is not one of {", ".join(ROLES)}')
        content = message.get(content_key)
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            return bad.fail(f'"{key}" message {i}: "{content_key}" must be a string, got {json_kind(content)}')
        if not bad.valid_text(content, f'"{key}" message {i}'):
            return None
        kept = {k: v for k, v in message.items() if k not in (role_key, content_key, "from", "value")}
        out.append({**kept, "role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        return bad.fail(f'"{key}" has no assistant message; there is nothing to learn from this record')
    return out


class _Bad:
    """Adds a record's problems, each starting with its location."""

    def __init__(self, problems: Problems, record: Record) -> None:
        self.problems, self.record = problems, record

    def fail(self, message: str) -> None:
        self.problems.add(self.record.line, f"{self.record.where}: {message}")
        return None

    def string(self, fields: dict[str, Any], name: str, required: bool = True) -> str | None:
        if name not in fields or (fields[name] is None and not required):
            if required:
                self.fail(f'missing field "{name}"; fields found: {fields_text(fields)}')
                return None
            return ""
        value = fields[name]
        if not isinstance(value, str):
            self.fail(f'field "{name}" must be a string, got {json_kind(value)}')
            return None
        return value if self.valid_text(value, f'field "{name}"') else None

    def valid_text(self, value: str, what: str) -> bool:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            self.fail(f"{what} holds an unpaired surrogate (\\u{ord(value[exc.start]):04x} at character "
                      f"{exc.start + 1}), which is not text")
            return False
        return True
