"""Time ``lema plan`` (the real CLI, as a subprocess) on a sparse Llama-2-70B file.

The file has the real 138 GB layout but is sparse (header only), so this measures what
the command costs: start-up, reading the header, planning, printing. Run:

    python benchmarks/plan_speed.py [--repeat 5]

It prints the command, the wall time of each run, the median, and for scale the wall
time of ``python -c "import torch"`` on the same machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lema.adapters.weights.builtin_models import builtin_config  # noqa: E402
from tests.sparse_models import write_sparse_safetensors  # noqa: E402


def _wall(cmd: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    lema = str(Path(sys.executable).parent / "lema")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_sparse_safetensors(Path(tmp) / "llama-2-70b.safetensors", builtin_config("llama-2-70b"), "F16")
        cmd = [lema, "plan", "--model", str(path), "--vram", "8G"]
        _wall(cmd)  # warm the page cache and the bytecode cache
        runs = [_wall(cmd) for _ in range(args.repeat)]
        # The same command with torch replaced by an empty stub module: what `lema plan`
        # costs once nothing on its path imports torch (today lema.domain.model.lora does).
        stub = ("import sys, types; t = types.ModuleType('torch'); t.Tensor = t.Generator = object; "
                "t.dtype = type(None); sys.modules['torch'] = t; from lema.cli import main; "
                f"sys.argv = ['lema', 'plan', '--model', {str(path)!r}, '--vram', '8G']; main()")
        stubbed = [_wall([sys.executable, "-c", stub]) for _ in range(args.repeat)]
    torch_import = statistics.median(_wall([sys.executable, "-c", "import torch"])[0] for _ in range(3))
    print(f"machine: {platform.machine()}, Python {platform.python_version()}, {platform.system()}")
    print("command: lema plan --model llama-2-70b.safetensors --vram 8G")
    print("runs (s, exit code): " + ", ".join(f"{t:.2f} ({rc})" for t, rc in runs))
    print(f"median: {statistics.median(t for t, _ in runs):.2f} s (requirement: < 2 s)")
    print("without torch (stubbed): " + ", ".join(f"{t:.2f} ({rc})" for t, rc in stubbed)
          + f"; median {statistics.median(t for t, _ in stubbed):.2f} s")
    print(f"for scale, python -c 'import torch': {torch_import:.2f} s (median of 3)")


if __name__ == "__main__":
    main()
