"""The demo quiet and under contention: how much a shared machine slows LEMA down.

Runs ``lema demo`` (in a fresh process, into a temporary folder) once on the quiet machine
and once beside ``--busy`` processes that each keep a core busy (``yes > /dev/null``, as a
user's other programs would), and prints both wall times and their ratio. On a machine of
``n`` cores with ``b`` busy processes, fair sharing alone explains a slowdown of about
``(n + b) / n`` for a program that uses every core; far more than that means LEMA's threads
wait on each other while the scheduler runs someone else (issue 21).

    python -m benchmarks.contention                  # the whole demo, 2 busy processes
    python -m benchmarks.contention --steps 24 --env OMP_WAIT_POLICY=ACTIVE

Run it on a quiet machine (check ``uptime``): its own "quiet" run is the baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def run_demo(steps: int, env: dict[str, str]) -> float:
    """Wall seconds of one ``lema demo --steps N`` in a fresh process."""
    out = tempfile.mkdtemp(prefix="lema-contention-")
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lema.cli", "demo", "--out", out, "--overwrite", "--steps", str(steps)],
                       check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="the demo's optimizer steps (default: the whole demo)")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the loaded run (default 2)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for both demo runs (repeatable)")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    with open("/proc/loadavg") as f:
        print(f"cores {os.cpu_count()}, load average before: {f.read().split()[0]}, env {env or 'as is'}")
    quiet = run_demo(args.steps, env)
    print(f"quiet: {quiet:.1f} s")
    busy = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.busy)]
    try:
        loaded = run_demo(args.steps, env)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    cores = os.cpu_count() or 1
    print(f"beside {args.busy} busy processes: {loaded:.1f} s = {loaded / quiet:.2f}x quiet "
          f"(fair sharing alone: {(cores + args.busy) / cores:.1f}x)")


if __name__ == "__main__":
    main()
