"""Conversations rendered with a chat template, and which tokens carry the loss.

The loss is taken on the assistant's tokens only:

* a template with ``{% generation %}`` marks: transformers' own
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` decides;
* a template without them: the conversation is rendered prefix by prefix (as TRL does):
  for each assistant message, the text from the end of the conversation before it
  (rendered with the generation prompt) to the end of the conversation including it is
  that message's span, and the tokens overlapping a span carry the loss.

The rendered text is tokenized without adding special tokens: the template places BOS
(and anything else) itself, so a template that starts with ``{{ bos_token }}`` never gets
a second one.

Example:
    >>> ids, mask = render_batch(tokenizer, [messages], template)[0]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from lema.errors import DataError

# A template is a page of Jinja; one rendering of one conversation takes microseconds and
# is about as long as the conversation. The bounds leave room for any honest template and
# stop a hostile one (nested range() loops, an exploding string) early.
MAX_TEMPLATE_CHARS = 256 * 1024
RENDER_SECONDS = 5.0
MAX_RENDERED_CHARS = 8 * 1024 * 1024


class TemplateRefused(DataError):
    """The chat template itself is refused (the sandbox stopped it, or it ran past the time
    or size bound): every conversation would fail the same way, so this stops the run."""


class _RenderTimeout(BaseException):
    """Raised into a rendering that ran past :data:`RENDER_SECONDS` (a BaseException, so the
    template's own error handling cannot swallow it)."""


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    """Raise :class:`_RenderTimeout` into the block after ``seconds`` (SIGALRM: main thread,
    POSIX, and no timer of someone else's running; otherwise unbounded)."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0]):
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sandbox_error() -> type[BaseException]:
    try:
        from jinja2.exceptions import SecurityError
    except ImportError:  # pragma: no cover - transformers needs jinja2 for chat templates
        return _RenderTimeout
    return SecurityError


def bounded(call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` (a template rendering) within the time and size bounds.

    Raises:
        TemplateRefused: the sandbox refused what the template does, it rendered for more
            than :data:`RENDER_SECONDS`, or wrote more than :data:`MAX_RENDERED_CHARS`.
    """
    try:
        with _time_bound(RENDER_SECONDS):
            out = call(*args, **kwargs)
    except _RenderTimeout:
        raise TemplateRefused(f"the chat template rendered one conversation for more than {RENDER_SECONDS:g} s "
                              "(a loop that does not end?); fix the template or pass another with --chat-template"
                              ) from None
    except _sandbox_error() as exc:
        raise TemplateRefused(f"the chat template does something the sandbox forbids ({_first_line(exc)}); "
                              "LEMA renders templates in a sandbox: fix the template or pass another with "
                              "--chat-template") from None
    size = len(out) if isinstance(out, str) else len(out.get("input_ids", ())) if isinstance(out, Mapping) else 0
    if size > MAX_RENDERED_CHARS:
        raise TemplateRefused(f"the chat template wrote {size:,} characters for one conversation (the bound is "
                              f"{MAX_RENDERED_CHARS:,}); fix the template or pass another with --chat-template")
    return out


def check_template_size(template: str, where: str) -> str:
    """``template``, or DataError when it is larger than :data:`MAX_TEMPLATE_CHARS`."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise DataError(f"{where}: the chat template is {len(template):,} characters long, more than the "
                        f"{MAX_TEMPLATE_CHARS:,} accepted; pass a template file with --chat-template")
    return template

GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")
# ChatML (Qwen, many fine-tunes), with generation marks: ``--chat-template chatml``.
CHATML = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
          "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{{ '\\n' }}{% else %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
BUILTIN = {"chatml": CHATML}


def resolve_template(tokenizer: Any, override: str | None) -> str | None:
    """The chat template to render with: ``override`` (a built-in name, a file, or the
    template text itself), else the tokenizer's own, else None.

    Raises:
        DataError: ``override`` names no built-in template, no file, and is not a template.
    """
    if override is None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        if not isinstance(template, str):
            return None
        return check_template_size(template, "the tokenizer's chat_template") or None
    if override in BUILTIN:
        return BUILTIN[override]
    path = Path(override).expanduser()
    if path.is_file():
        try:
            with open(path, "rb") as f:
                raw = f.read(4 * MAX_TEMPLATE_CHARS + 1)  # a tokenizer_config.json holds more than the template
            if len(raw) > 4 * MAX_TEMPLATE_CHARS:
                raise DataError(f"--chat-template: {path} is larger than {4 * MAX_TEMPLATE_CHARS // 1024} KiB; "
                                "pass a Jinja template file")
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"--chat-template: {path} is not UTF-8 text; pass a Jinja template file") from None
        if path.suffix == ".json":  # a tokenizer_config.json
            import json

            try:
                text = json.loads(text).get("chat_template") or ""
            except (ValueError, AttributeError):
                text = ""
            if not isinstance(text, str) or not text:
                raise DataError(f"--chat-template: {path} has no \"chat_template\" string")
        return check_template_size(text, f"--chat-template {path}")
    if "{{" in override or "{%" in override:
        return check_template_size(override, "--chat-template")
    raise DataError(f"--chat-template: {override!r} is not a file, a built-in template ({', '.join(BUILTIN)}) "
                    "or Jinja template text")


def has_generation_marks(template: str) -> bool:
    """True when the template marks the assistant's text with ``{% generation %}``."""
    return bool(GENERATION_MARK.search(template))


def render_text(tokenizer: Any, messages: Sequence[dict[str, Any]], template: str,
                add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it (no tokenization), within the bounds.

    Raises:
        TemplateRefused: see :func:`bounded`; anything else the template raises.
    """
    return bounded(tokenizer.apply_chat_template, list(messages), chat_template=template, tokenize=False,
                   add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, Any]], template: str,
                    roles: Sequence[str] = ("assistant",)) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant messages, found
    by rendering it prefix by prefix.

    Raises:
        ValueError: the template does not render a conversation as the concatenation of
            its prefixes (the caller reports the record).
    """
    messages = list(messages)
    full = render_text(tokenizer, messages, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] not in roles:
            continue
        try:  # an assistant's span starts after its header (the generation prompt); another role's at its header
            before = render_text(tokenizer, messages[:i], template,
                                 add_generation_prompt=message["role"] == "assistant")
        except TemplateRefused:
            raise
        except Exception:  # noqa: BLE001 - many templates refuse an empty conversation
            if i:
                raise
            before = ""
        through = render_text(tokenizer, messages[:i + 1], template)
        if not through.startswith(before) or not full.startswith(through):
            raise ValueError(f"the template does not render message {i + 1} after the messages before it "
                             "(a conversation's rendering is not its start's rendering plus the rest)")
        spans.append((len(before), len(through)))
    return full, spans


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose character range overlaps a span (transformers' rule for
    ``return_assistant_tokens_mask``), else 0.

    Example:
        >>> span_mask([(0, 3), (3, 5), (5, 9)], [(4, 6)])
        [0, 1, 1]
    """
    mask = [0] * len(offsets)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0] and end > start:
            mask[t] = 1
    return mask


def render_batch(tokenizer: Any, conversations: Sequence[Sequence[dict[str, Any]]], template: str,
                 roles: Sequence[str] = ("assistant",)) -> list[tuple[list[int], list[int]] | str]:
    """Token ids and loss masks (the tokens of ``roles``' turns) of each conversation, or the
    problem (a string) of a conversation the template cannot render. Generation marks
    only mark the assistant: other roles are found by rendering prefixes."""
    results: list[tuple[list[int], list[int]] | str] = []
    if has_generation_marks(template) and tuple(roles) == ("assistant",):
        for conv in conversations:
            try:
                out = bounded(tokenizer.apply_chat_template, list(conv), chat_template=template, tokenize=True,
                              return_dict=True, return_assistant_tokens_mask=True)
            except TemplateRefused:
                raise
            except Exception as exc:  # noqa: BLE001 - a template raises what its author wrote
                results.append(f"the chat template cannot render this conversation ({_first_line(exc)})")
                continue
            results.append((list(out["input_ids"]), list(out["assistant_masks"])))
        return results
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    where: list[int] = []
    for conv in conversations:
        try:
            text, found = assistant_spans(tokenizer, conv, template, roles)
        except TemplateRefused:
            raise
        except ValueError as exc:  # the prefix rendering rule failed: generation marks make it unnecessary
            results.append(f"the chat template cannot render this conversation ({_first_line(exc)}); give the "
                           "template {% generation %} marks, or pass another with --chat-template")
            continue
        except Exception as exc:  # noqa: BLE001 - a template raises what its author wrote
            results.append(f"the chat template cannot render this conversation ({_first_line(exc)}); fix the "
                           "conversation or the template, or pass another with --chat-template")
            continue
        where.append(len(results))
        results.append(("", []))  # filled below
        texts.append(text)
        spans.append(found)
    if texts:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for k, index in enumerate(where):
            ids = list(enc["input_ids"][k])
            results[index] = (ids, span_mask(enc["offset_mapping"][k], spans[k]))
    return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def end_of_turn_ids(tokenizer: Any, template: str) -> list[int]:
    """The special tokens the template writes right after an assistant's text (``<|im_end|>``,
    ``<|eot_id|>``, ``</s>``...): where a chat reply ends."""
    marker = "lemareplymarker"
    try:
        text = render_text(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                           template)
    except TemplateRefused:
        raise
    except Exception:  # noqa: BLE001 - a template may refuse such a short conversation
        return []
    tail = text[text.rfind(marker) + len(marker):]
    specials = set(getattr(tokenizer, "all_special_ids", []) or []) | set(
        getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return [i for i in ids if i in specials][:1]
