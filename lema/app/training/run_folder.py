"""The folder of a command-line training run (``lema train --out``): its lock, what it may
already hold, and the checkpoint a resume continues from.

A run folder holds ``final/``, ``checkpoint-<step>/``, ``metrics.jsonl``,
``train_args.json`` and, while a run is going, the lock file ``.lema.lock``
(:mod:`lema.adapters.checkpoints.run_lock`). :func:`open_run` takes the lock first, then
cleans what a killed run left (its temporary checkpoint folders; an interrupted
checkpoint swap's recovery copy is renamed back, see
:mod:`lema.adapters.checkpoints.atomic`) and decides whether the run may start there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import attrs

from lema.adapters.checkpoints.atomic import backup_path, clean_stale_temps, recover_directory
from lema.adapters.checkpoints.run_lock import LOCK_NAME, RunLock, acquire_run_lock
from lema.domain.json_values import parse_json
from lema.errors import CheckpointError, OutputError

METRICS = "metrics.jsonl"
ARGS = "train_args.json"
FINAL = "final"
_NEEDED = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json")


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint folder was saved at; -1 when it is not a complete
    checkpoint (a file missing, or ``trainer_state.json`` unreadable)."""
    if not all((path / name).is_file() for name in _NEEDED):
        return -1
    try:
        state = parse_json((path / "trainer_state.json").read_bytes())
        step = state["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else -1


def recover_checkpoints(out: Path) -> list[Path]:
    """Rename back every recovery copy (``.<name>.backup``) whose checkpoint is missing: a
    save killed between its two renames leaves the previous checkpoint only there."""
    restored = []
    for backup in sorted(out.glob(".*.backup")):
        target = out / backup.name[1:-len(".backup")]
        if backup_path(target) == backup and recover_directory(target):
            restored.append(target)
    return restored


def why_unusable(out: Path) -> str:
    """``": <the problem>"`` of the first checkpoint in ``out`` whose state cannot be read, or ""."""
    from lema.adapters.checkpoints.checkpoint_fields import check_trainer_state
    from lema.adapters.json_files import read_json_object

    for folder in sorted([out / FINAL, *out.glob("checkpoint-*")]):
        state_file = folder / "trainer_state.json"
        if not state_file.is_file():
            continue
        try:
            state = read_json_object(state_file, "trainer state", CheckpointError, fix="the checkpoint is corrupt")
            check_trainer_state(state, state_file)
            if "global_step" not in state:
                raise CheckpointError(f"{state_file}: no global_step; the checkpoint is corrupt")
        except CheckpointError as exc:
            return f": {exc}"
    return ""


def latest_checkpoint(out: Path, echo: Callable[[str], None] | None = None) -> Path | None:
    """The complete checkpoint in ``out`` with the highest step (``final`` or
    ``checkpoint-<step>``; ``final`` wins a tie), recovery copies included."""
    if not out.is_dir():
        return None
    for path in recover_checkpoints(out):
        if echo is not None:
            echo(f"note: restored {path.name} from the recovery copy an interrupted save left")
    scored = []
    for path in [out / FINAL, *sorted(out.glob("checkpoint-*"))]:
        if not path.is_dir():
            continue
        step = checkpoint_step(path)
        if step < 0:
            if echo is not None:
                echo(f"note: skipping {path}: not a complete checkpoint")
            continue
        scored.append((step, path.name == FINAL, path))
    return max(scored, key=lambda s: (s[0], s[1]))[2] if scored else None


@attrs.define
class RunFolder:
    """A locked run folder and the checkpoint to resume from (None: start at step 0)."""

    out: Path
    lock: RunLock
    checkpoint: Path | None
    created: bool

    def close(self) -> None:
        """Release the lock (and remove the folder if this run created it and left it empty)."""
        self.lock.release()
        if self.created:
            with contextlib.suppress(OSError):
                self.out.rmdir()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_run(out: Path, *, resume: bool, echo: Callable[[str], None] = print) -> RunFolder:
    """Lock ``out`` and decide where the run starts.

    Without ``resume`` the folder must be new or empty; with it, the newest complete
    checkpoint is the start (a folder whose run stopped before its first checkpoint starts
    again at step 0).

    Raises:
        RunInUseError: another live ``lema train`` holds the folder.
        OutputError: ``out`` is a file, or holds something without ``resume``.
        CheckpointError: ``resume`` and no run in ``out``.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder for the run's checkpoints")
    created = not out.exists()
    lock, note = acquire_run_lock(out)
    run = RunFolder(out=out, lock=lock, checkpoint=None, created=created)
    try:
        if note:
            echo(f"warning: {note}")
        for stale in clean_stale_temps(out):
            echo(f"note: removed {stale.name}, left by an interrupted save")
        ckpt = latest_checkpoint(out, echo)
        if resume:
            # A checkpoint that cannot be read is an error, not a run "stopped before its first
            # checkpoint": restarting at step 0 would silently drop the steps it holds.
            why = why_unusable(out) if ckpt is None else ""
            if ckpt is None and (why or not (out / ARGS).is_file()):
                raise CheckpointError(f"--resume: no usable checkpoint in {out} (looked for final/ and "
                                      f"checkpoint-<step>/){why}; run without --resume to start fresh")
            if ckpt is None:
                echo(f"note: the run in {out} stopped before its first checkpoint; starting it again at step 0")
            run.checkpoint = ckpt
            return run
        if ckpt is not None:
            raise OutputError(f"--out: {out} already holds checkpoints ({ckpt.name} is the latest); pass --resume to "
                              "continue that run, or choose another --out")
        held = sorted(e.name for e in out.iterdir() if e.name != LOCK_NAME)
        if held:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            hint = ("; or pass --resume to continue the run there (it stopped before its first checkpoint)"
                    if (out / ARGS).is_file() else "")
            raise OutputError(f"--out: {out} is not empty (holds {shown}); LEMA does not train over existing "
                              f"files: choose a new or empty folder{hint}")
        return run
    except BaseException:
        run.close()
        raise
