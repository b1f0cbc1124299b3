"""Train a model file larger than this machine's RAM: 2 steps in place and 2 under a 4 GiB budget.

The file is Llama-shaped (hidden 5120, fp32 by default: ``--dtype BF16`` for bf16) with enough
layers to be ``--ratio`` times MemTotal (24 fp32 or 48 bf16 layers, ~31 GiB, on a 23.5 GiB
machine); it is sparse: holes for most decoder
weights, real random bytes for the embedding, the head and two layers (``tests/streamed_steps.py``),
so it costs ~2 GB of disk. Each run is its own process; the script prints each run's
anonymous memory peak and step times, checks both peaks are under 4 GiB and that the two
runs' adapter updates agree (tests/tolerance.py), and deletes the file.

    python benchmarks/sparse_larger_than_ram.py --dir /var/tmp      # ~5-8 minutes on a quiet machine

Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1 << 30


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def run(cmd: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.streamed_steps", *cmd], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the sparse file")
    parser.add_argument("--ratio", type=float, default=1.3, help="file size / MemTotal")
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--intermediate", type=int, default=13824)
    parser.add_argument("--budget", default="4G")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (a small check)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="F32", choices=("F32", "BF16"),
                        help="F32 (default): the adapters of the two runs are held to the fp32 rounding floor; "
                             "BF16: the paths round differently (~3e-3 relative), checked against bf16's floor")
    args = parser.parse_args()

    import torch

    from lema.adapters.weights.model_files import resolve_model
    from tests.tolerance import assert_close, forward_floor, rounding_floor

    h, i = args.hidden, args.intermediate
    width = 4 if args.dtype == "F32" else 2
    per_layer = (4 * h * h + 3 * h * i) * width
    layers = args.layers or max(2, math.ceil((args.ratio * mem_total() - 2 * 32000 * h * width) / per_layer))
    heads = max(1, h // 128)
    work = Path(tempfile.mkdtemp(prefix="lema-larger-", dir=args.dir))
    model = work / "model.safetensors"
    try:
        size = run(["write", "--out", str(model), "--layers", str(layers), "--hidden", str(h),
                    "--intermediate", str(i), "--heads", str(heads), "--dtype", args.dtype])["bytes"]
        print(f"model: {layers} layers, {size / GIB:.1f} GiB ({size / mem_total():.2f}x MemTotal "
              f"{mem_total() / GIB:.1f} GiB), {os.stat(model).st_blocks * 512 / GIB:.1f} GiB on disk", flush=True)
        results = {}
        for name, extra in (("in place", []), (f"budget {args.budget}", ["--budget", args.budget])):
            out = work / f"{name.split()[0]}.pt"
            r = run(["train", "--model", str(model), "--steps", str(args.steps), "--adapters", str(out), *extra])
            results[name] = (r, out)
            print(f"{name}: steps {', '.join(f'{s:.1f} s' for s in r['step_s'])}; loss "
                  f"{', '.join(f'{x:.4f}' for x in r['loss'])}; anonymous memory peak {r['anon_peak'] / GIB:.2f} GiB "
                  f"(at start {r['anon_start'] / GIB:.2f} GiB)", flush=True)
        ok = all(r["anon_peak"] < 4 * GIB for r, _ in results.values())
        (a, a_path), (b, b_path) = results.values()
        spec = resolve_model(str(model)).spec
        try:
            floor = (forward_floor(spec, 16, extra=2) if args.dtype == "F32"
                     else rounding_floor(torch.bfloat16, 16, depth=4))
            err = assert_close(torch.load(b_path), torch.load(a_path), floor=floor, what="adapters")
            print(f"adapters: budget vs in place, relative error {err:.2e} (within the tolerance rule)")
        except AssertionError as exc:
            print(f"adapters differ: {exc}")
            ok = False
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


if __name__ == "__main__":
    raise SystemExit(main())
