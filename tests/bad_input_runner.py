"""Run bad-input corpus cases in one fresh process; print one JSON list of results.

Usage: ``python -m tests.bad_input_runner ROOT CASES_JSON`` (the cwd becomes ROOT, where
the cases' relative paths point). Every command line of every case runs through click's
``CliRunner`` in this process (one torch import for all of them); for each it records the
exit status, stdout/stderr, any exception that escaped the command, the wall time, and the
process's peak resident memory so far (``VmHWM``, a high-water mark: the largest value
bounds every command before it; not ``ru_maxrss``, which Linux carries over from the parent
at exec, so a large pytest process would be charged to every case). The imports all commands share are done first, untimed. A case with ``fsize`` runs under that ``RLIMIT_FSIZE``,
so writes past it fail as on a full disk (``SIGXFSZ`` is ignored so the write returns an
error instead of killing the process).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path


def run_cases(root: Path, cases: list[dict]) -> list[dict]:
    from click.testing import CliRunner

    from lema.cli import main as lema_cli

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # The imports every command shares (torch, transformers, the tokenizer's) are paid once
    # here, so each command's time is its own.
    from lema.app.training.model import LemaModel  # noqa: F401
    from lema.data.tokenizer import load_tokenizer

    load_tokenizer(root / "good" / "model")
    results = []
    for case in cases:
        for argv in case["commands"]:
            out = root / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)
            if case["fsize"]:
                resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], limit[1]))
            began = time.perf_counter()
            try:
                result = CliRunner().invoke(lema_cli, list(argv))
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            seconds = time.perf_counter() - began
            exc = result.exception
            escaped = None if exc is None or isinstance(exc, SystemExit) else "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__))
            results.append({
                "kind": case["kind"], "name": case["name"], "argv": list(argv), "expect": case["expect"],
                "exit_code": result.exit_code, "stdout": result.stdout[-2000:], "stderr": result.stderr[-4000:],
                "escaped": escaped, "seconds": seconds,
                "maxrss_bytes": _peak_rss(),
            })
    return results


def _peak_rss() -> int:
    """This process's own peak resident memory in bytes (``VmHWM`` of /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def main() -> None:
    root, cases_file = Path(sys.argv[1]), Path(sys.argv[2])
    cases = json.loads(cases_file.read_text(encoding="utf-8"))
    os.chdir(root)
    json.dump(run_cases(root, cases), sys.stdout)


if __name__ == "__main__":
    main()
