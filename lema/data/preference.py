"""Preference data: TRL's formats, tokenized as TRL 1.16 does, batched with each pair kept together.

Formats (every source ``lema train`` reads: JSON Lines / JSON, Parquet, CSV, folders, Hub):

* paired (DPO, IPO, ORPO, SimPO): ``{"prompt", "chosen", "rejected"}`` with text or
  conversations (``[{"role", "content"}, ...]``); or the implicit-prompt form, ``chosen`` and
  ``rejected`` alone, whose shared beginning is the prompt (TRL's ``extract_prompt``);
* unpaired (KTO): ``{"prompt", "completion", "label"}`` (``label`` true: desirable).

Tokenization (TRL's ``DPOTrainer._prepare_dataset``): for text, the EOS token is appended as
text to each answer that does not end with it; the prompt and prompt + answer are tokenized
with the tokenizer's own special tokens (conversations: the chat template, with the
generation prompt on the prompt alone); the answer starts where the tokenized prompt stops
matching the tokenized prompt + answer (the smaller of the two answers' points for a pair).
A batch of pairs is ``[prompt+chosen rows..., prompt+rejected rows...]``, right-padded, each
row cut to ``seq`` tokens from its end (TRL's ``keep_start``: the prompt is kept first);
``labels`` are the answer tokens (-100 elsewhere). A KTO batch is ``[prompt_i + completion_i
..., prompt_i + completion_{i-1} ...]`` (TRL's KL rows: completions rotated by one within each
batch of the file's order) plus ``desirable``.

Bad rows (a missing or non-text field, an empty answer, chosen == rejected, a prompt that
fills ``seq`` by itself) are reported together, one line each with its line number.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import attrs
import torch

from lema.data import records as rec
from lema.data.chat import bounded, resolve_template
from lema.errors import DataError

__all__ = ["PairExample", "UnpairedExample", "collate_pairs", "collate_unpaired", "load_preference",
           "tokenize_pair", "tokenize_unpaired"]

IGNORE = -100


@attrs.frozen
class PairExample:
    """A tokenized preference pair."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    reference: tuple[float, float] | None = None  # the cached reference log-probs (chosen, rejected)

    def __len__(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@attrs.frozen
class UnpairedExample:
    """A tokenized KTO row: prompt, completion, the KL row's completion, and its label."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    kl_completion: tuple[int, ...]
    desirable: bool
    reference: tuple[float, float] | None = None  # the cached reference log-probs (completion, KL row)

    def __len__(self) -> int:
        return 2 * len(self.prompt) + len(self.completion) + len(self.kl_completion)


def _conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's ``extract_prompt``: the shared beginning of ``chosen`` and ``rejected`` (turns or
    characters) is the prompt; a space just before the split stays with the answers."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _ids(tokenizer: Any, value: Any, template: str | None = None, generation: bool = False) -> list[int]:
    if isinstance(value, list):
        out = bounded(tokenizer.apply_chat_template, value, chat_template=template, tokenize=True, return_dict=True,
                      add_generation_prompt=generation)
        return list(out["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _fields(fields: dict[str, Any], names: Sequence[str]) -> str | None:
    missing = [n for n in names if fields.get(n) in (None, "")]
    if missing:
        return f"no {' or '.join(repr(n) for n in missing)} field (or it is empty)"
    return None


def tokenize_pair(tokenizer: Any, fields: dict[str, Any], template: str | None = None) -> PairExample | str:
    """A row of paired data as TRL tokenizes it, or what is wrong with it (a message)."""
    problem = _fields(fields, ("chosen", "rejected"))
    if problem:
        return problem
    chosen, rejected = fields["chosen"], fields["rejected"]
    prompt = fields.get("prompt")
    conversational = _conversation(chosen)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not (isinstance(value, str) or _conversation(value)) or _conversation(value) != conversational:
            return f"{name!r} is neither text nor a conversation like the other answer"
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    elif conversational != _conversation(prompt) or not (isinstance(prompt, str) or _conversation(prompt)):
        return "'prompt' must be text when the answers are text, and a conversation when they are"
    if not chosen or not rejected:
        return "an answer is empty (chosen and rejected have nothing after the shared prompt)"
    if chosen == rejected:
        return "chosen and rejected are the same answer: the pair prefers nothing"
    if conversational:
        if not template:
            return "conversations need a chat template: the tokenizer has none; pass --chat-template"
        p = _ids(tokenizer, prompt, template, generation=True)
        pc = _ids(tokenizer, prompt + chosen, template)
        pr = _ids(tokenizer, prompt + rejected, template)
    else:
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        p, pc, pr = _ids(tokenizer, prompt), _ids(tokenizer, prompt + chosen), _ids(tokenizer, prompt + rejected)
    n = min(_common(p, pc), _common(p, pr))
    if len(pc) <= n or len(pr) <= n:
        return "an answer has no tokens of its own after the prompt"
    return PairExample(tuple(p[:n]), tuple(pc[n:]), tuple(pr[n:]))


def tokenize_unpaired(tokenizer: Any, fields: dict[str, Any], template: str | None = None
                      ) -> tuple[tuple[int, ...], tuple[int, ...], bool] | str:
    """A KTO row as TRL tokenizes it: ``(prompt ids, completion ids, desirable)``, or a message."""
    problem = _fields(fields, ("prompt", "completion"))
    if problem:
        return problem
    label = fields.get("label")
    if not isinstance(label, bool):
        return f"'label' must be true (desirable) or false, not {label!r}"
    prompt, completion = fields["prompt"], fields["completion"]
    conversational = _conversation(completion)
    if conversational != _conversation(prompt) or not (isinstance(completion, str) or conversational):
        return "'prompt' and 'completion' must both be text or both conversations"
    if conversational:
        if not template:
            return "conversations need a chat template: the tokenizer has none; pass --chat-template"
        p = _ids(tokenizer, prompt, template, generation=True)
        pc = _ids(tokenizer, prompt + completion, template)
    else:
        eos = tokenizer.eos_token or ""
        completion = completion if completion.endswith(eos) else completion + eos
        p, pc = _ids(tokenizer, prompt), _ids(tokenizer, prompt + completion)
    n = _common(p, pc)
    if len(pc) <= n:
        return "the completion has no tokens of its own after the prompt"
    return tuple(p[:n]), tuple(pc[n:]), label


def load_preference(data: str, tokenizer: Any, *, method: str, seq: int, batch: int = 1,
                    chat_template: str | None = None, max_line_bytes: int = rec.MAX_LINE_BYTES
                    ) -> list[PairExample] | list[UnpairedExample]:
    """Read and tokenize ``data`` for ``method`` (``kto``: unpaired rows; else pairs).

    Args:
        batch: KTO: rows per batch, the span within which the KL rows' completions rotate.

    Raises:
        DataError: bad rows (all listed, one line each, with their line numbers), or none.
    """
    from lema.data.sources import open_source

    source = open_source(data, max_line_bytes)
    if source.rows is None:
        raise DataError(f"{data}: preference data is records (JSON Lines, JSON, Parquet, CSV), not plain text; "
                        "give rows with prompt/chosen/rejected (kto: prompt/completion/label)")
    template = resolve_template(tokenizer, chat_template)
    problems = rec.Problems(source.name)
    rows: list[Any] = []
    for record in source.rows(problems):
        out = (tokenize_unpaired if method == "kto" else tokenize_pair)(tokenizer, record.fields, template)
        if isinstance(out, str):
            problems.add(record.line, f"{record.where}: {out}")
            continue
        prompt_len = len(out[0] if isinstance(out, tuple) else out.prompt)
        if prompt_len >= seq:
            problems.add(record.line, f"{record.where}: the prompt alone has {prompt_len} tokens, --seq {seq} leaves "
                                      "no room for an answer")
            continue
        rows.append(out)
    fields = "prompt/completion/label" if method == "kto" else "prompt/chosen/rejected (or chosen/rejected)"
    problems.raise_if_any(f"preference rows need {fields}; fix or remove these rows")
    if not rows:
        raise DataError(f"{data}: no preference rows")
    if method != "kto":
        return rows
    out: list[UnpairedExample] = []
    for start in range(0, len(rows), max(1, batch)):
        chunk = rows[start:start + max(1, batch)]
        rotated = [chunk[-1][1]] + [r[1] for r in chunk[:-1]]
        out.extend(UnpairedExample(p, c, kl, d) for (p, c, d), kl in zip(chunk, rotated))
    return out


def _rows(pairs: Iterable[tuple[Sequence[int], Sequence[int]]], pad_id: int, seq: int | None
          ) -> dict[str, torch.Tensor]:
    ids, labels = [], []
    for prompt, answer in pairs:
        row = list(prompt) + list(answer)
        lab = [IGNORE] * len(prompt) + list(answer)
        if seq is not None:
            row, lab = row[:seq], lab[:seq]
        ids.append(row)
        labels.append(lab)
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (row, lab) in enumerate(zip(ids, labels)):
        input_ids[i, :len(row)] = torch.tensor(row)
        label_t[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "labels": label_t, "attention_mask": mask}


def collate_pairs(examples: Sequence[PairExample], pad_id: int, seq: int | None = None) -> dict[str, Any]:
    """``[prompt+chosen..., prompt+rejected...]`` rows (see the module docstring)."""
    return _with_reference(examples, _rows([(e.prompt, e.chosen) for e in examples]
                                           + [(e.prompt, e.rejected) for e in examples], pad_id, seq))


def _with_reference(examples: Sequence[Any], out: dict[str, Any]) -> dict[str, Any]:
    """Add ``reference``: the rows' cached reference log-probs, when every example has them."""
    if examples and all(e.reference is not None for e in examples):
        out["reference"] = torch.tensor([e.reference[0] for e in examples] + [e.reference[1] for e in examples],
                                        dtype=torch.float32)
    return out


def collate_unpaired(examples: Sequence[UnpairedExample], pad_id: int, seq: int | None = None) -> dict[str, Any]:
    """``[prompt+completion..., prompt+KL completion...]`` rows plus ``desirable``."""
    out = _rows([(e.prompt, e.completion) for e in examples] + [(e.prompt, e.kl_completion) for e in examples],
                pad_id, seq)
    out["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return _with_reference(examples, out)
