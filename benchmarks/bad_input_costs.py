"""What bad input costs now: planning absurd configs, refusing a 50 MB data line (issue #11).

Run:

    python benchmarks/bad_input_costs.py

Each measurement is a fresh ``lema`` process (its wall time and peak RSS from ``wait4``):

1. ``lema plan --strategy auto --vram 8G`` on Llama configs with 32, 1,000 and 4,096 layers
   (the bound), and on 10,000 and 10^8 layers (refused).
2. In one process, AUTO's residency search (binary search + tail scan) against trying every
   count (the previous algorithm), for 1,000 and 4,096 layers: the ratio.
3. ``lema train`` on a text file with one 50 MiB line (refused before tokenizing), and for
   scale the peak RSS of tokenizing one 2 MiB line with the same byte-level tokenizer.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
         "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096}


def _run(cmd: list[str], cwd: Path | None = None) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, exit code, last stderr line) of one child process."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd, text=True)
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    last = (err.strip().splitlines() or [""])[-1]
    return time.perf_counter() - began, usage.ru_maxrss * 1024, proc.returncode, last


def _plan_runs(lema: str, tmp: Path) -> None:
    print("1. lema plan --model CONFIG --vram 8G --strategy auto")
    for layers in (32, 1000, 4096, 10_000, 10**8):
        path = tmp / f"llama-{layers}.json"
        path.write_text(json.dumps({**LLAMA, "num_hidden_layers": layers}))
        seconds, rss, code, last = _run([lema, "plan", "--model", str(path), "--vram", "8G", "--strategy", "auto"])
        note = f"  ({last[:90]})" if code == 2 else ""
        print(f"   {layers:>11,} layers: {seconds:6.2f} s, peak RSS {rss / 2**20:5.0f} MiB, exit {code}{note}")


def _residency_ratio() -> None:
    from lema.domain.model.spec import ModelSpec
    from lema.domain.plan.assemble import _resident_prefix, _summary, auto_resident, build, facts_for
    from lema.domain.plan.inputs import Budget, TrainingShape

    print("2. AUTO residency search vs trying every count (one process)")
    for layers in (1000, 4096):
        spec = ModelSpec.from_config({**LLAMA, "hidden_size": 512, "intermediate_size": 1376,
                                      "num_attention_heads": 8, "num_hidden_layers": layers})
        shape = TrainingShape(strategy="auto")
        budget = Budget(int(spec.weight_bytes * 0.6))
        f = facts_for(spec, shape)
        summary = _summary(spec, shape, f)
        began = time.perf_counter()
        fast = auto_resident(summary, f, shape, budget)
        t_fast = time.perf_counter() - began
        began = time.perf_counter()
        best = max((k for k in range(layers + 2)
                    if build(summary, f, shape, budget, _resident_prefix(layers, k)).fits), default=0)
        t_all = time.perf_counter() - began
        assert fast == _resident_prefix(layers, best)
        print(f"   {layers:>5} layers: search {t_fast * 1000:7.1f} ms, every count {t_all * 1000:8.1f} ms, "
              f"ratio {t_all / t_fast:5.0f}x, same answer ({len(fast)} units resident)")


def _long_line(lema: str, tmp: Path) -> None:
    from tests.demo_models import byte_tokenizer, tiny_llama_folder

    print("3. lema train --data FILE with one 50 MiB line (default --max-line-size 1M)")
    model = tiny_llama_folder(tmp / "model")
    data = tmp / "long.txt"
    data.write_text("first line\n" + "x" * (50 << 20) + "\nlast\n")
    seconds, rss, code, last = _run([lema, "train", "--model", str(model), "--data", str(data), "--out",
                                     str(tmp / "run"), "--device", "cpu"])
    print(f"   refused: {seconds:.2f} s, peak RSS {rss / 2**20:.0f} MiB, exit {code} ({last[:100]})")
    byte_tokenizer().save_pretrained(tmp / "tok")
    script = ("import resource, sys; from transformers import AutoTokenizer; "
              f"t = AutoTokenizer.from_pretrained({str(tmp / 'tok')!r}); "
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
              "t(['word ' * ((2 << 20) // 5)], add_special_tokens=False); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    grew = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout.strip()) * 1024
    print(f"   for scale: tokenizing one 2 MiB line grows the peak RSS by {grew / 2**20:.0f} MiB "
          f"({grew / (2 << 20):.0f} bytes per byte of text)")


def main() -> None:
    lema = str(Path(sys.executable).parent / "lema")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        _plan_runs(lema, Path(tmp))
        _residency_ratio()
        _long_line(lema, Path(tmp))


if __name__ == "__main__":
    main()
