"""A model file larger than the page cache, read from the drive every step: LEMA vs ``dd``, predicted vs measured.

Writes a Llama-shaped model of real (random) bytes, ``--ratio`` times MemTotal (1.3: ~31 GiB
on a 23.5 GiB machine; it needs that much free disk, and is deleted at the end), then in
one run:

1. ``dd if=FILE of=/dev/null iflag=direct bs=16M``: the drive's sequential rate, no cache;
2. LEMA's reader alone: every unit of the model read into a slot as a streamed step does
   (``SafetensorsSource`` with the run's readers and page-cache policy), pages dropped first;
3. ``--steps`` training steps of the model (``device=cpu``, ``--budget`` as the device
   budget: the weights go through slots as on a GPU; ``--budget none``: in place), the
   file's pages dropped before each (``posix_fadvise(DONTNEED)``; root may add
   ``--drop-caches`` for ``/proc/sys/vm/drop_caches``); each step's bytes read from the
   drive (``/proc/self/io`` read_bytes) over its time is LEMA's read throughput per step;
4. the plan's disk term (``LemaModel.disk``: bytes per step at the measured read rate).

It prints one line per measurement and a JSON summary; issue 24's bar: LEMA's reader >= 80%
of dd, and the predicted step within 20% of the measured one for a disk-bound run.

    python benchmarks/larger_than_ram.py --dir /var/tmp                  # full size: ~20-40 minutes
    python benchmarks/larger_than_ram.py --dir /tmp --size 1G --ram 600M --steps 1  # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1 << 30


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def read_bytes() -> int:
    """Bytes this process (all its threads) had read from storage so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def drop_pages(path: Path, drop_caches: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def dd_rate(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "iflag=direct", "bs=16M"], check=True,
                   capture_output=True)
    return os.path.getsize(path) / (time.perf_counter() - start)


class _Ram:
    """A host with ``available`` bytes of RAM left (``--ram``)."""

    def __init__(self, available: int) -> None:
        self.available = available

    def available_bytes(self) -> int:
        return self.available

    def describe(self) -> str:
        return "--ram"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the model (a local disk)")
    parser.add_argument("--ratio", type=float, default=1.3, help="file size / MemTotal")
    parser.add_argument("--size", default=None, help="file size instead of --ratio (e.g. 1G: a quick check)")
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--intermediate", type=int, default=13824)
    parser.add_argument("--budget", default="4G", help="device budget of the CPU device; 'none': in place")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--drop-caches", action="store_true", help="also write 1 to /proc/sys/vm/drop_caches (root)")
    parser.add_argument("--keep", action="store_true", help="keep the model file (default: delete it)")
    parser.add_argument("--ram", default=None, help="pretend this much host RAM is available (a small check of "
                        "the larger-than-RAM path; default: the machine's MemAvailable)")
    args = parser.parse_args()

    import attrs
    import torch

    from lema import LemaConfig, LemaModel
    from lema.adapters.weights.safetensors_source import SafetensorsSource
    from lema.app.bootstrap import disk_readers
    from lema.domain.schedule.slot_layout import slot_bytes
    from lema.domain.units import parse_size
    from tests.streamed_steps import llama_config, write_model

    h, i = args.hidden, args.intermediate
    per_layer = (4 * h * h + 3 * h * i) * 2
    target = parse_size(args.size, field="--size") if args.size else int(args.ratio * mem_total())
    layers = max(2, math.ceil((target - 2 * 32000 * h * 2) / per_layer))
    work = Path(tempfile.mkdtemp(prefix="lema-ltr-", dir=args.dir))
    model = work / "model.safetensors"
    summary: dict = {}
    try:
        start = time.perf_counter()
        size = write_model(model, llama_config(layers, h, i, 32000, max(1, h // 128)), "BF16",
                           dense=tuple(range(layers)))
        os.sync()
        print(f"model: {layers} layers, {size / GIB:.1f} GiB of random bf16 ({size / mem_total():.2f}x MemTotal), "
              f"written in {time.perf_counter() - start:.0f} s", flush=True)
        drop_pages(model, args.drop_caches)
        dd = dd_rate(model)
        print(f"dd iflag=direct bs=16M: {dd / GIB:.2f} GiB/s", flush=True)
        summary |= {"file_bytes": size, "dd_bytes_per_s": dd}

        budget = None if args.budget == "none" else args.budget
        config = LemaConfig(gbi_path=str(model), device="cpu", vram_budget=budget, max_seq_len=args.seq,
                            lora_rank=8, prefetch_distance=2)
        with LemaModel(config, host_memory=None if args.ram is None else _Ram(parse_size(args.ram, field="--ram"))
                       ) as lema:
            disk = lema.disk
            print(disk.line() if disk is not None else "disk: no disk term (RESIDENT?)", flush=True)
            source = lema.source
            # LEMA's reader alone: every streamed unit into a slot, as a step's forward does.
            spec = lema.spec
            if isinstance(source, SafetensorsSource):
                reader = SafetensorsSource(spec, model, readers=disk_readers(), keep_bytes=source.keep_bytes)
                buffer = torch.empty(slot_bytes(spec.units[1:]), dtype=torch.uint8)
                drop_pages(model, args.drop_caches)
                before, start = read_bytes(), time.perf_counter()
                for u in spec.units[1:]:
                    reader.read_into(u.index, buffer)  # the bytes alone (a step checks finiteness once)
                seconds = time.perf_counter() - start
                reader.close()
                got = read_bytes() - before
                rate = reader.bytes_copied / seconds
                print(f"LEMA reader: {reader.bytes_copied / GIB:.1f} GiB in {seconds:.1f} s = {rate / GIB:.2f} GiB/s "
                      f"({rate / dd:.0%} of dd; {got / GIB:.1f} GiB from the drive)", flush=True)
                summary |= {"reader_bytes_per_s": rate, "reader_vs_dd": rate / dd}
            lema.initialize_lora()
            trainer = lema.get_trainer(torch.optim.SGD(lema.get_trainable_parameters(), lr=0.01))
            ids = torch.arange(1, args.seq + 1).unsqueeze(0)
            steps = []
            for n in range(args.steps):
                drop_pages(model, args.drop_caches)
                before, start = read_bytes(), time.perf_counter()
                trainer.train_step(ids)
                seconds = time.perf_counter() - start
                got = read_bytes() - before
                steps.append({"seconds": seconds, "disk_bytes": got, "bytes_per_s": got / seconds})
                print(f"step {n + 1}: {seconds:.1f} s, {got / GIB:.1f} GiB from the drive = {got / seconds / GIB:.2f} "
                      f"GiB/s ({got / seconds / dd:.0%} of dd)", flush=True)
            summary["steps"] = steps
            from lema.adapters.weights.read_rate import measure_read_rate

            fresh = measure_read_rate(model)  # this run's rate (the plan's may come from the cache)
            if fresh is not None and disk is not None and disk.keep is not None:
                print(f"read rate measured now: {fresh / GIB:.2f} GiB/s (the plan's: {disk.read_rate / GIB:.2f} GiB/s, "
                      f"{disk.rate_source}); the plan's steady state at it: {disk.bytes_per_step / fresh:.1f} s",
                      flush=True)
                disk = attrs.evolve(disk, read_rate=fresh, rate_source="measured now")
            if disk is not None and disk.keep is not None and disk.read_rate > 0:
                # The pages were dropped before each step: the whole step's reads hit the drive
                # (the plan's steady state keeps a share cached between steps; here nothing is).
                first = sum(s["disk_bytes"] for s in steps) / len(steps)
                predicted = first / disk.read_rate
                measured = sum(s["seconds"] for s in steps) / len(steps)
                print(f"predicted disk time per step {predicted:.1f} s (this run's bytes at the measured rate; the "
                      f"plan's steady state: {disk.seconds:.1f} s), measured step {measured:.1f} s "
                      f"({measured / predicted - 1:+.0%})", flush=True)
                summary |= {"plan_disk_seconds": disk.seconds, "predicted_seconds": predicted,
                            "measured_seconds": measured, "read_rate": disk.read_rate}
        print(json.dumps(summary))
        return 0
    finally:
        if not args.keep:
            for f in work.iterdir():
                f.unlink()
            work.rmdir()


if __name__ == "__main__":
    raise SystemExit(main())
