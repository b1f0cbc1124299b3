"""The data of a training run: ``--data`` (and ``--eval-data`` / ``--eval-split``) read,
tokenized once into ``$LEMA_CACHE/data``, and packed or padded into batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import attrs

from lema.errors import ConfigError, DataError


@attrs.frozen(kw_only=True)
class RunData:
    """What the training loop iterates, and what to tell the user about it.

    Attributes:
        items: the training examples, or their packed rows.
        collate_fn: makes a batch of ``items``.
        eval_examples: held-out examples, or None.
        store: the training examples' store.
        lines: one line per data set read (format, examples, tokens, cache, packing).
    """

    items: Sequence[Any]
    collate_fn: Callable[..., Any]
    eval_examples: Any
    store: Any
    lines: tuple[str, ...]


def prepare_data(data: str | Sequence[str], tokenizer: Any, *, seq: int, format: str | None = None,
                 chat_template: str | None = None, packing: bool = False, eval_data: str | None = None,
                 eval_split: float | None = None, seed: int = 0, cache: bool = True,
                 max_line_bytes: int | None = None, progress: Callable[[str], None] | None = None,
                 weights: str | None = None, mapping: dict[str, Any] | None = None,
                 epochs: str | None = None) -> RunData:
    """Read, tokenize (or open from the cache) and arrange the run's data.

    ``data``: one data set, or several mixed by ``weights`` (``--data-weights``: the share of
    each, :mod:`lema.data.mixing`); ``mapping``: :class:`~lema.data.loading.DataOptions`'
    ``fields``, ``train_on_inputs`` and ``roles_to_train``.

    Raises:
        ConfigError: ``eval_data`` and ``eval_split`` both given.
        DataError: see :func:`lema.data.loading.load_data`.
    """
    from lema.app.training.run_inputs import cache_dir
    from lema.data.loading import DataOptions, load_data, split_eval
    from lema.data.mixing import mix, parse_weights
    from lema.data.packing import as_batches_input, describe

    if eval_data is not None and eval_split is not None:
        raise ConfigError("pass --eval-data or --eval-split, not both")
    options = DataOptions(seq=seq, format=format, chat_template=chat_template,
                          cache_dir=(cache_dir() / "data") if cache else None, progress=progress,
                          **({} if max_line_bytes is None else {"max_line_bytes": max_line_bytes}),
                          **(mapping or {}))
    sets = [data] if isinstance(data, str) else list(data)
    shares = parse_weights(weights, len(sets))
    passes = parse_weights(epochs, len(sets), "--data-epochs")
    if shares is not None and passes is not None:
        raise ConfigError("pass --data-weights (shares) or --data-epochs (passes over each), not both")
    if (shares is not None or passes is not None) and len(sets) < 2:
        raise ConfigError(f"{'--data-weights' if shares else '--data-epochs'}: give two or more --data to mix")
    loaded = [load_data(one, tokenizer, options) for one in sets]
    lines = [f"data: {one}: {t.describe()}" for one, t in zip(sets, loaded)]
    store, held = mix([t.store for t in loaded], shares, seed, passes), None
    if len(sets) > 1:
        drawn = store.meta.get("sources", [len(t.store) for t in loaded])
        lines.append("mix: " + ", ".join(f"{n:,} of {one}" for n, one in zip(drawn, sets))
                     + (f" (--data-weights {weights})" if shares is not None else "")
                     + (f" (--data-epochs {epochs})" if passes is not None else ""))
    data = sets[0] if len(sets) == 1 else " + ".join(sets)
    if eval_split is not None:
        store, held = split_eval(store, eval_split, seed)
        lines.append(f"eval: {len(held):,} examples ({held.n_tokens:,} tokens) held out of {data} (--eval-split "
                     f"{eval_split:g})")
    elif eval_data is not None:
        evaluated = load_data(eval_data, tokenizer, options)
        held = evaluated.store
        lines.append(f"eval: {eval_data}: {evaluated.describe()}")
    items, collate_fn = as_batches_input(store, packing, seq, seed)
    if packing:
        lines.append(f"packing: {describe(items)}")
    return RunData(items=items, collate_fn=collate_fn, eval_examples=held, store=store, lines=tuple(lines))


def check_vocab(store: Any, vocab_size: int, data: str | Path) -> None:
    """DataError when the tokenizer made ids the model has no embedding for."""
    top = store.max_token()
    if top >= vocab_size:
        raise DataError(f"{data}: the tokenizer produces token id {top} but the model's vocabulary has "
                        f"{vocab_size} entries; pass the model's own tokenizer with --tokenizer")
