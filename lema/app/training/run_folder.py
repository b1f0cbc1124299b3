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
import re
import shutil
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
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


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


def written_by_lema(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder LEMA wrote and can read back: a real folder (no
    symlink) holding only the files a checkpoint holds, its state readable, and, for
    ``checkpoint-<step>``, saved at that step. Only such folders are ever replaced or pruned:
    a user's ``checkpoint-1000/notes.txt`` or a file named ``checkpoint-1`` is not."""
    from lema.adapters.checkpoints.store import CHECKPOINT_FILES

    if path.is_symlink() or not path.is_dir():
        return False
    try:
        names = {entry.name for entry in path.iterdir()}
    except OSError:
        return False
    if not names <= CHECKPOINT_FILES:
        return False
    step = checkpoint_step(path)
    m = _CHECKPOINT_NAME.match(path.name)
    return step >= 0 and (m is None or int(m[1]) == step)


def keep_or_replace(path: Path, step: int, keep_existing: bool) -> bool:
    """Whether a checkpoint save at ``step`` into ``path`` keeps what is there (True: do not
    write); raises when it may neither keep nor replace it.

    A save replaces only a checkpoint LEMA wrote, or an empty folder; a save after a failure
    or a signal (``keep_existing``) replaces nothing, and keeps a checkpoint of this step.

    Raises:
        CheckpointError: ``path`` holds something the save may not replace.
    """
    if not (path.exists() or path.is_symlink()):
        return False
    ours = written_by_lema(path)
    if ours and keep_existing and checkpoint_step(path) == step:
        return True
    empty = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    if (ours and keep_existing) or (not ours and not empty):
        what = "a checkpoint of another step" if ours else "not a checkpoint LEMA wrote (or not one it can read back)"
        raise CheckpointError(f"{path} exists and is {what}; LEMA does not replace it: move it out of {path.parent}"
                              + (", then resume" if keep_existing else ""))
    return False


def named_step(path: Path) -> int | None:
    """The step in a ``checkpoint-<step>`` name, or None for any other name."""
    m = _CHECKPOINT_NAME.match(path.name)
    return int(m[1]) if m else None


def foreign_outputs(out: Path, first: int, last: int) -> list[Path]:
    """What a run saving checkpoints at steps ``first..last`` (and ``final``) would replace
    in ``out`` that LEMA did not write: files or folders named like its checkpoints."""
    if not out.is_dir():
        return []
    found = []
    for entry in sorted(out.iterdir()):
        step = named_step(entry)
        if (entry.name == FINAL or (step is not None and first <= step <= last)) and not written_by_lema(entry):
            found.append(entry)
    return found


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


def _clear(out: Path) -> int:
    """Remove everything in ``out`` but the lock (``--overwrite``); the count removed."""
    import shutil

    removed = 0
    for entry in sorted(out.iterdir()):
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed += 1
    return removed


def open_run(out: Path, *, resume: bool, echo: Callable[[str], None] = print, overwrite: bool = False) -> RunFolder:
    """Lock ``out`` and decide where the run starts.

    Without ``resume`` the folder must be new or empty (``overwrite``: what it holds is
    removed first, once the lock is held); with it, the newest complete
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
        if overwrite and not resume:
            removed = _clear(out)
            if removed:
                echo(f"--overwrite: removed {removed} entr{'y' if removed == 1 else 'ies'} an earlier run left in "
                     f"{out}")
        ckpt = latest_checkpoint(out, echo)
        if resume:
            # A checkpoint that cannot be read is an error, not a run "stopped before its first
            # checkpoint": restarting at step 0 would silently drop the steps it holds.
            why = why_unusable(out) if ckpt is None else ""
            if ckpt is None and not why:  # checkpoint folders, none complete: not a run that never saved
                left = [p.name for p in [out / FINAL, *sorted(out.glob("checkpoint-*"))] if p.is_dir()]
                why = f": {', '.join(left[:3])} {'is' if len(left) == 1 else 'are'} not complete" if left else ""
            if ckpt is None and (why or not (out / ARGS).is_file()):
                raise CheckpointError(f"--resume: no usable checkpoint in {out} (looked for final/ and "
                                      f"checkpoint-<step>/){why}; run without --resume to start fresh")
            if ckpt is None:
                echo(f"note: the run in {out} stopped before its first checkpoint; starting it again at step 0")
            run.checkpoint = ckpt
            return run
        if ckpt is not None:
            raise OutputError(f"--out: {out} already holds checkpoints ({ckpt.name} is the latest); pass --resume to "
                              "continue that run, --overwrite to replace it, or choose another --out")
        held = sorted(e.name for e in out.iterdir() if e.name != LOCK_NAME)
        if held:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            hint = ("; or pass --resume to continue the run there (it stopped before its first checkpoint)"
                    if (out / ARGS).is_file() else "")
            raise OutputError(f"--out: {out} is not empty (holds {shown}); LEMA does not train over existing "
                              f"files: choose a new or empty folder, or pass --overwrite to replace them{hint}")
        return run
    except BaseException:
        run.close()
        raise


def prune_checkpoints(out: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``checkpoint-<step>`` folders of ``out`` (never ``final``).

    Only folders LEMA wrote and can read back as checkpoints count
    (:func:`~lema.app.training.run_folder.written_by_lema`): anything else named ``checkpoint-*``
    (a user's notes, a file, a symlink, a folder with files of its own) is neither deleted
    nor counted.
    """
    if keep <= 0:
        return []
    found = sorted((checkpoint_step(p), p) for p in out.iterdir()
                   if named_step(p) is not None and written_by_lema(p))
    removed = [p for _, p in found[:-keep]]
    for p in removed:
        shutil.rmtree(p)
    return removed
