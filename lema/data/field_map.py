"""The data's own field names mapped to LEMA's, before the format is detected.

``{"dialog": [{"speaker": "human", "text": ...}]}`` with ``--messages-field dialog
--role-key speaker --content-key text --roles human=user,bot=assistant`` reads as
``{"messages": [{"role": "user", "content": ...}]}`` (axolotl's ``field_messages``,
``message_property_mappings`` and ``roles``); ``--text-field``, ``--prompt-field`` and
``--completion-field`` name the fields of plain text and prompt/completion records (TRL's
``dataset_text_field``). A record without a mapped field is left as it is (the format's
own message names what is missing).

Example:
    >>> m = FieldMap(messages="dialog", role="speaker", content="text", roles=(("bot", "assistant"),))
    >>> m.apply_fields({"dialog": [{"speaker": "bot", "text": "hi"}]})
    {'messages': [{'role': 'assistant', 'content': 'hi'}]}
"""

from __future__ import annotations

from typing import Any

import attrs

from lema.data.formats import ROLES
from lema.data.records import Record
from lema.errors import DataError


@attrs.frozen(kw_only=True)
class FieldMap:
    """Which of a record's fields hold what LEMA reads (None: LEMA's own name)."""

    messages: str | None = None
    role: str | None = None
    content: str | None = None
    roles: tuple[tuple[str, str], ...] = ()
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    @property
    def identity(self) -> bool:
        return self == FieldMap()

    def describe(self) -> dict[str, Any]:
        """What the tokenized-data cache key records."""
        return attrs.asdict(self)

    def apply(self, record: Record) -> Record:
        return record if self.identity else Record(record.where, record.line, self.apply_fields(record.fields))

    def apply_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        out = dict(fields)
        for ours, theirs in (("text", self.text), ("prompt", self.prompt), ("completion", self.completion),
                             ("messages", self.messages)):
            if theirs is not None and theirs != ours and theirs in out:
                out[ours] = out.pop(theirs)
        if self.role is not None or self.content is not None or self.roles:
            for key in ("messages", "conversations", "prompt", "completion"):
                if isinstance(out.get(key), list):
                    out[key] = [self._message(m) for m in out[key]]
        return out

    def _message(self, message: Any) -> Any:
        if not isinstance(message, dict):
            return message  # the format says what is wrong with it
        m = dict(message)
        if self.role is not None and self.role in m and self.role != "role":
            m["role"] = m.pop(self.role)
        if self.content is not None and self.content in m and self.content != "content":
            m["content"] = m.pop(self.content)
        names = dict(self.roles)
        for key in ("role", "from"):
            if isinstance(m.get(key), str) and m[key] in names:
                m[key] = names[m[key]]
        return m


def parse_roles(text: str | None, option: str = "--roles") -> tuple[tuple[str, str], ...]:
    """``"human=user,bot=assistant"`` -> pairs (DataError naming ``option`` when malformed)."""
    if not text:
        return ()
    pairs = []
    for part in text.split(","):
        name, eq, role = part.strip().partition("=")
        if not eq or not name.strip() or role.strip() not in ROLES:
            raise DataError(f"{option}: {part.strip()!r} must be NAME=ROLE with ROLE one of {', '.join(ROLES)}, "
                            "e.g. human=user,bot=assistant")
        pairs.append((name.strip(), role.strip()))
    return tuple(pairs)


def parse_roles_to_train(text: str | None, option: str = "--roles-to-train") -> tuple[str, ...]:
    """``"assistant,user"`` -> roles (DataError for a role that is not one of LEMA's)."""
    roles = tuple(r.strip() for r in (text or "assistant").split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise DataError(f"{option}: {', '.join(map(repr, bad)) or 'nothing'}: give roles among {', '.join(ROLES)}")
    return roles
