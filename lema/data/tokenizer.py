"""Tokenizers: a byte-level BPE trained locally, and loading a tokenizer folder safely.

Both return a ``transformers.PreTrainedTokenizerFast`` (or whatever class the folder's
``tokenizer_config.json`` names among transformers' own), so anything that reads Hugging
Face tokenizers reads ours: ``save_pretrained(folder)`` then
``AutoTokenizer.from_pretrained(folder)``.

Example:
    >>> tok = build_byte_tokenizer("the cat sat on the mat. " * 50, vocab_size=300)
    >>> tok.decode(tok("the cat")["input_ids"], skip_special_tokens=True)
    'the cat'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from lema.errors import ConfigError, ModelFormatError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# The files that make a folder a tokenizer folder (any one of them is enough).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_MIN_VOCAB = 256 + 3  # the 256 byte symbols plus pad, bos, eos


def build_byte_tokenizer(corpus_text: str | Iterable[str], vocab_size: int = 512,
                         extra_special_tokens: Sequence[str] = ()) -> Any:
    """Train a byte-level BPE tokenizer on ``corpus_text`` (no network, a few seconds at most).

    Every byte has a symbol, so any UTF-8 text round-trips. Special tokens: ``<|pad|>`` (id
    0), ``<|bos|>`` (1), ``<|eos|>`` (2); encoding with ``add_special_tokens=True`` (the
    default) prepends ``<|bos|>``, as Llama's tokenizer does.

    Args:
        corpus_text: the training text, or an iterable of text pieces (e.g. lines).
        vocab_size: the vocabulary size, at least 259 (bytes + specials); a small corpus may
            stop short of it when no pair is left to merge.
        extra_special_tokens: more special tokens (e.g. a chat template's ``<|user|>``), with
            ids 3, 4, ... after pad, bos and eos; never split, and skipped by
            ``decode(..., skip_special_tokens=True)``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Raises:
        ConfigError: ``vocab_size`` below 259 or an empty corpus.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    minimum = _MIN_VOCAB + len(extra_special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ConfigError(f"vocab_size: {vocab_size!r} must be an integer >= {minimum} (256 bytes + "
                          f"{minimum - 256} specials)")
    pieces = [corpus_text] if isinstance(corpus_text, str) else list(corpus_text)
    if not any(p.strip() for p in pieces):
        raise ConfigError("build_byte_tokenizer: the corpus is empty; pass some text to learn merges from")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, *extra_special_tokens],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_lines(pieces), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)
    if extra_special_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return fast


def _lines(pieces: list[str]) -> Iterator[str]:
    for piece in pieces:
        yield from piece.splitlines(keepends=True)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a tokenizer from a local folder (or a ``tokenizer.json`` file); never runs remote code.

    A tokenizer without a pad token gets its eos token as pad (batches need one).

    Args:
        path: a folder holding ``tokenizer.json`` (or ``tokenizer.model``, or
            ``vocab.json`` + ``merges.txt``), or the path of a ``tokenizer.json`` file.

    Returns:
        A transformers tokenizer.

    Raises:
        ConfigError: the path does not exist or holds no tokenizer files.
        ModelFormatError: the files are there but transformers cannot read them.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"tokenizer: {p} does not exist; pass a folder holding tokenizer.json")
    _check_sizes(p)
    try:
        if p.is_file():
            if p.name != "tokenizer.json" and p.suffix != ".json":
                raise ConfigError(f"tokenizer: {p} is a file but not a tokenizer.json; pass the tokenizer's folder")
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        else:
            if not any((p / name).is_file() for name in TOKENIZER_MARKERS):
                raise ConfigError(f"tokenizer: no tokenizer files in {p} (looked for "
                                  f"{', '.join(TOKENIZER_MARKERS)}); pass a tokenizer folder with --tokenizer")
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False, local_files_only=True)
    except (ConfigError, ModelFormatError):
        raise
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(f"tokenizer: cannot load {p}: {first}") from None
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    return tok


# The largest published tokenizer.json (Gemma 3's) is 33 MB: 128 MiB bounds what a hostile
# folder can make the tokenizer libraries read into memory.
MAX_TOKENIZER_FILE_BYTES = 128 * 1024 * 1024
_TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                         "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _check_sizes(path: Path) -> None:
    """Refuse, without reading them, tokenizer files that are not regular files or are far
    larger than any real one."""
    files = [path] if path.is_file() else [path / name for name in _TOKENIZER_FILE_NAMES]
    for f in files:
        if not (f.exists() or f.is_symlink()):
            continue
        if not f.is_file():
            raise ConfigError(f"tokenizer: {f} is not a regular file; pass a tokenizer folder of plain files")
        size = f.stat().st_size
        if size > MAX_TOKENIZER_FILE_BYTES:
            raise ConfigError(f"tokenizer: {f} is {size:,} bytes, far larger than any tokenizer file (at most "
                              f"{MAX_TOKENIZER_FILE_BYTES:,}); is this the right folder?")


def sidecar_dir(model_file: str | os.PathLike[str]) -> Path:
    """Where ``lema convert`` and ``lema merge`` put a model file's tokenizer: ``X.safetensors``
    -> ``X.tokenizer/`` beside it."""
    p = Path(model_file)
    return p.with_name(p.stem + ".tokenizer")


def find_tokenizer_dir(*candidates: str | os.PathLike[str] | None) -> Path | None:
    """The first candidate folder that holds tokenizer files, or None.

    A candidate that is a file (a ``.safetensors`` model) stands for its tokenizer folder
    (:func:`sidecar_dir`), then the folder it is in.
    """
    for c in candidates:
        if c is None:
            continue
        p = Path(c).expanduser()
        places = [sidecar_dir(p), p.parent] if p.is_file() else [p]
        for place in places:
            if place.is_dir() and any((place / name).is_file() for name in TOKENIZER_MARKERS):
                return place
    return None
