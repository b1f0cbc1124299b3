"""The reference column: the reference model's log-probs computed once per data set and cached.

TRL's ``precompute_ref_log_probs``: instead of the reference forward in every training pass
(:class:`~lema.app.runtime.preference_pass.PreferencePass`'s same-pass reference), one
no-grad pass over the data set (batches of the run's size, file order,
:func:`~lema.app.runtime.preference_pass.reference_logps_two_pass`) gives each row's summed
answer log-prob under the reference (the frozen starting adapter, or the base). They are
written beside the run (``reference_logps.safetensors``, atomically), keyed by the data's
tokens, the reference adapter, the base weights and the row length, and read back by a
later run or ``--resume`` with the same key. The examples then carry their two values
(``PairExample.reference`` / ``UnpairedExample.reference``), the collate functions put them
in the batch, and the training passes skip the reference forward: a pass moves SFT's link
bytes and does SFT's compute plus the head's log-probs; the column costs one forward pass
over the data set per key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs
import torch

from lema.domain.model import heads

FILE = "reference_logps.safetensors"


def cache_key(items: Sequence[Any], reference: Any, weights_id: str, seq: int, method: str) -> str:
    """sha256 of what the column depends on: every row's tokens, the reference adapter's
    tensors (or "base"), the base weights' identity, the row length and the method."""
    h = hashlib.sha256(f"{weights_id}|seq={seq}|{method}|".encode())
    for e in items:
        for field in attrs.astuple(attrs.evolve(e, reference=None), recurse=False)[:-1]:
            h.update(repr(field).encode())
        h.update(b";")
    if reference is None:
        h.update(b"base")
    else:
        for layer in reference.layers:
            for key in sorted(layer):
                for t in layer[key]:
                    h.update(key.encode())
                    h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def with_reference_column(model: Any, items: Sequence[Any], collate: Callable[..., dict[str, Any]],
                          pad_id: int, batch: int, reference: Any, out_dir: Path, key: str,
                          echo: Callable[[str], None] = lambda _: None) -> list[Any]:
    """``items`` with their ``reference`` values, from ``out_dir / FILE`` when its key is
    ``key``, else computed (one no-grad pass over the data) and written there."""
    from safetensors import safe_open
    from safetensors.torch import save

    from lema.adapters.checkpoints.atomic import atomic_write_bytes

    path = out_dir / FILE
    column = None
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                column = f.get_tensor("logps")
        if column is not None and tuple(column.shape) != (len(items), 2):
            column = None
    if column is None:
        column = compute_column(model, items, collate, pad_id, batch, reference)
        atomic_write_bytes(path, save({"logps": column}, metadata={"key": key}))
        echo(f"reference log-probs of {len(items):,} rows computed once (no-grad pass) and cached in {path}")
    else:
        echo(f"reference log-probs read from {path}")
    values = column.tolist()
    return [attrs.evolve(e, reference=(v[0], v[1])) for e, v in zip(items, values)]


def compute_column(model: Any, items: Sequence[Any], collate: Callable[..., dict[str, Any]],
                   pad_id: int, batch: int, reference: Any) -> torch.Tensor:
    """``(len(items), 2)`` float32: each example's two rows' summed reference answer log-probs."""
    from lema.app.runtime.preference_pass import reference_logps_two_pass

    out = torch.empty((len(items), 2), dtype=torch.float32)
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        b = collate(chunk, pad_id)
        ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
        with torch.no_grad():  # training=False: no dropout seed drawn (the run's RNG stays as it was)
            ctx, x0 = model.prepare_inputs(ids, mask, training=False)
            targets = model.targets_for(ids, None, mask)
            answer = model.targets_for(ids, labels, mask) != heads.IGNORE_INDEX
            logps, _ = reference_logps_two_pass(model.engine, model.cast_weights, model.spec, ctx, x0, targets,
                                                answer, reference, tile=model.plan().tile_tokens)
            del ctx, x0
        rows = logps.answer.detach().to("cpu", torch.float32)
        n = len(chunk)
        out[start:start + n, 0], out[start:start + n, 1] = rows[:n], rows[n:]
    return out
