"""The run folder of ``lema train`` under torchrun: rank 0 locks and prepares it, every rank
agrees on the checkpoint it resumes from.

Only rank 0 writes into ``--out`` (the lock, metrics, checkpoints), so only rank 0 opens the
run folder (:func:`lema.app.training.run_folder.open_run`: lock, clean-up, the resume decision). The
other ranks wait for it, then find the same checkpoint themselves; if a rank sees another
step (``--out`` not shared between machines), every rank stops with one message.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from lema.app.parallel.distributed import Ranks
from lema.app.parallel.rank_agreement import settle
from lema.app.training.run_folder import RunFolder, checkpoint_step, latest_checkpoint, open_run
from lema.errors import CheckpointError


@contextlib.contextmanager
def open_ranked_run(out: Path, *, resume: bool, ranks: Ranks,
                    echo: Callable[[str], None] = print, overwrite: bool = False) -> Iterator[Path | None]:
    """Yield the checkpoint this run starts from (None: step 0), on every rank.

    Raises:
        whatever :func:`~lema.app.training.run_folder.open_run` raises on rank 0 (on every rank);
        CheckpointError: the ranks see different checkpoints in ``out``.
    """
    if not ranks.distributed:
        with open_run(out, resume=resume, echo=echo, overwrite=overwrite) as run:
            yield run.checkpoint
        return
    run: RunFolder | None = None
    error = None
    if ranks.is_main:
        try:
            run = open_run(out, resume=resume, echo=echo, overwrite=overwrite)
        except Exception as exc:  # noqa: BLE001 - every rank stops with it in settle
            error = exc
    settle(error)  # rank 0 has locked and cleaned the folder
    try:
        ckpt = run.checkpoint if run is not None else (latest_checkpoint(out) if resume else None)
        step = checkpoint_step(ckpt) if ckpt is not None else -1
        n, total, squares = settle(None, [1, step, step * step])
        if n * squares != total * total:  # equal steps everywhere iff the variance is 0
            raise CheckpointError(f"--out {out}: the ranks do not see the same checkpoint (this one: "
                                  f"{ckpt.name if ckpt is not None else 'none'}); put --out on a filesystem every "
                                  "machine shares, or copy the run folder to each before --resume")
        yield ckpt
    finally:
        if run is not None:
            run.close()
