"""A model file larger than the page cache, read from the drive every step: LEMA vs ``dd``, predicted vs measured.

Writes a Llama-shaped model of real (random) bytes, ``--ratio`` times MemTotal (1.3: ~31 GiB
on a 23.5 GiB machine; it needs that much free disk, and is deleted at the end), then in
one run:

1. ``dd if=FILE of=/dev/null iflag=direct bs=16M``: the drive's sequential rate, no cache;
2. the sustained calibration LEMA's plan uses (:func:`lema.adapters.weights.read_rate.measure`:
   buffered with pages dropped, as the run reads; run-sized requests in parallel over the
   whole file, up to 24 GiB / 15 s), with a
   fresh ``$LEMA_CACHE`` so the plan measures it now;
3. LEMA's reader alone: every unit of the model read into a slot as a streamed step does
   (the run's readers and page-cache policy), pages dropped first;
4. ``--steps`` training steps (``device=cpu``; ``--budget`` as the device budget: the weights
   go through slots as on a GPU; ``--budget none``: in place) with ``--strategy`` (default
   auto: its host tier holds what fits the RAM left, ``--ram`` to pretend less), the file's
   pages dropped before each (``--between drop``, the issue's protocol; root may add
   ``--drop-caches``) or left as LEMA's policy leaves them (``--between keep``, the plan's
   steady state): per step, the bytes read from the drive (``/proc/self/io``), LEMA's read
   rate, the measured step and the predicted one (the plan's until the first step from disk
   has been measured, the rate that step saw after: ``DiskFeedback``, as the progress line);
5. the host tier's effect: the same steps with ``--strategy streaming`` (``--no-tier-effect``
   skips it): bytes from the drive and seconds per step without the tier.

It prints one line per measurement and a JSON summary; issue 24's bar: LEMA's reader >= 80%
of dd, and the predicted step within 20% of the measured one.

    python benchmarks/larger_than_ram.py --dir /var/tmp                  # full size: ~30-50 minutes
    python benchmarks/larger_than_ram.py --dir /var/tmp --size 1G --ram 700M --hidden 1024 --intermediate 2816 \
        --budget 256M --steps 3                                          # a quick check: ~1-2 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
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


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else 0.0


def run_steps(model: Path, args: argparse.Namespace, strategy: str, budget: str | None, ram: "_Ram | None",
              dd: float, reader: bool) -> dict:
    """``args.steps`` training steps of ``model`` with ``strategy``: per step the drive's bytes,
    LEMA's read rate, the measured and the predicted seconds."""
    import attrs
    import torch

    from lema import LemaConfig, LemaModel
    from lema.app.bootstrap import disk_readers
    from lema.app.training.step_time import DiskFeedback, _planned_step, predicted_step_seconds
    from lema.domain.plan import disk_time as dt
    from lema.domain.schedule.slot_layout import slot_bytes, unit_buffer_bytes

    out: dict = {"strategy": strategy, "steps": []}
    config = LemaConfig(gbi_path=str(model), device="cpu", vram_budget=budget, max_seq_len=args.seq,
                        lora_rank=8, prefetch_distance=2, strategy=strategy)
    with LemaModel(config, host_memory=ram) as lema:
        disk = lema.disk
        print(f"[{strategy}] " + (disk.line() if disk is not None else "disk: no disk term (RESIDENT?)"), flush=True)
        out |= {"plan_line": None if disk is None else disk.line(),
                "held_bytes": 0 if disk is None else disk.held_bytes,
                "plan_read_rate": None if disk is None else disk.read_rate,
                "plan_rate_source": None if disk is None else disk.rate_source}
        source = lema.source
        stream = getattr(source, "stream", source)
        spec = lema.spec
        if reader:  # LEMA's reader alone: every unit into a slot, as a step's forward does
            from lema.adapters.weights.safetensors_source import SafetensorsSource

            alone = SafetensorsSource(spec, model, readers=disk_readers(), keep_bytes=getattr(stream, "keep_bytes", 0))
            buffer = torch.empty(slot_bytes(spec.units[1:]), dtype=torch.uint8)
            drop_pages(model, args.drop_caches)
            before, start = read_bytes(), time.perf_counter()
            for u in spec.units[1:]:
                alone.read_into(u.index, buffer)  # the bytes alone (a step checks finiteness once)
            seconds = time.perf_counter() - start
            alone.close()
            got = read_bytes() - before
            rate = alone.bytes_copied / seconds
            print(f"LEMA reader: {alone.bytes_copied / GIB:.1f} GiB in {seconds:.1f} s = {rate / GIB:.2f} GiB/s "
                  f"({rate / dd:.0%} of dd; {got / GIB:.1f} GiB from the drive)", flush=True)
            out |= {"reader_bytes_per_s": rate, "reader_vs_dd": rate / dd}
        cold = disk
        if disk is not None and disk.keep is not None and args.between == "drop":
            # Pages dropped before each step: nothing of the page-cache share survives between
            # steps; the prediction is the plan's reads with no share kept (the held units stay).
            p = lema.plan()
            in_place = lema.device.traits.in_place
            streamed = tuple(u.index for u in spec.units[1:]) if in_place else tuple(p.streamed_units)
            turn = 0 if in_place else max(0, p.slot_count - (1 if spec.n_layers + 1 in streamed else 0))
            reads = [u for u in dt.step_reads(streamed, spec.n_layers, p.shape.training, turn) if u not in disk.held]
            sizes = {u.index: unit_buffer_bytes(u) for u in spec.units}
            cold = attrs.evolve(disk, bytes_per_step=dt.disk_bytes_per_step(reads, sizes, 0, dt.IN_FLIGHT))
        lema.disk = cold
        lema.initialize_lora()
        trainer = lema.get_trainer(torch.optim.SGD(lema.get_trainable_parameters(), lr=0.01))
        ids = torch.arange(1, args.seq + 1).unsqueeze(0)
        feedback = DiskFeedback(lema)
        predicted = predicted_step_seconds(lema)
        planned = _planned_step(lema)
        print(f"[{strategy}] compute predicted {planned.compute_seconds:.2f} s, link {planned.link_seconds:.2f} s; "
              f"drive {0 if cold is None else cold.seconds:.2f} s ({0 if cold is None else cold.bytes_per_step / GIB:.2f}"
              f" GiB per step)", flush=True)
        for n in range(args.steps):
            if args.between == "drop":
                drop_pages(model, args.drop_caches)
            feedback.begin()
            reading = getattr(stream, "read_seconds", 0.0)
            before, start = read_bytes(), time.perf_counter()
            trainer.train_step(ids)
            seconds = time.perf_counter() - start
            got = read_bytes() - before
            reading = getattr(stream, "read_seconds", 0.0) - reading  # the prefetch thread's reads (slot path)
            shown = predicted
            predicted = feedback.after(seconds, predicted)
            row = {"seconds": seconds, "predicted_seconds": shown, "disk_bytes": got, "bytes_per_s": got / seconds,
                   "read_seconds": reading, "error": None if not shown else seconds / shown - 1}
            out["steps"].append(row)
            print(f"[{strategy}] step {n + 1}: {seconds:.1f} s (predicted {shown:.1f} s, {seconds / shown - 1:+.0%}), "
                  f"{got / GIB:.2f} GiB from the drive = {got / seconds / GIB:.2f} GiB/s ({got / seconds / dd:.0%} of "
                  f"dd)" + (f"; reads took {reading:.1f} s of it ({got / reading / GIB:.2f} GiB/s while reading)"
                            if reading > 0 else ""), flush=True)
        if feedback.rate:
            print(f"[{strategy}] the rate the first step saw: {feedback.rate / GIB:.2f} GiB/s; later steps predicted "
                  f"{predicted:.1f} s", flush=True)
        out |= {"rate_seen": feedback.rate, "predicted_after_feedback": predicted}
    return out


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
    parser.add_argument("--strategy", default="auto", choices=("auto", "streaming"))
    parser.add_argument("--between", default="drop", choices=("drop", "keep"),
                        help="drop the file's pages before each step (the issue's protocol), or keep LEMA's share")
    parser.add_argument("--no-tier-effect", dest="tier_effect", action="store_false",
                        help="skip the second run with --strategy streaming")
    parser.add_argument("--ram", default=None, help="pretend this much host RAM is available (a small check of "
                        "the larger-than-RAM path; default: the machine's MemAvailable)")
    args = parser.parse_args()

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

        os.environ["LEMA_CACHE"] = str(work / "cache")  # the plan measures the drive now, not a cached rate
        from lema.adapters.weights import read_rate as rr

        drop_pages(model, args.drop_caches)
        # Measured now and cached (a sample no larger than the file, so a small check caches it too): the plan uses it.
        calibration = rr.read_rate(model, sample=min(rr.SAMPLE, size), refresh=True)
        if calibration is not None:
            print(f"sustained calibration: {calibration[0] / GIB:.2f} GiB/s ({calibration[1]}; "
                  f"{calibration[0] / dd:.0%} of dd)", flush=True)
            summary |= {"calibration_bytes_per_s": calibration[0], "calibration": calibration[1]}
        ram = None if args.ram is None else _Ram(parse_size(args.ram, field="--ram"))
        budget = None if args.budget == "none" else args.budget
        summary["run"] = run_steps(model, args, args.strategy, budget, ram, dd, reader=True)
        if args.tier_effect and args.strategy == "auto":
            summary["streaming"] = run_steps(model, args, "streaming", budget, ram, dd, reader=False)
            tiered, plain = summary["run"], summary["streaming"]
            later = slice(1, None) if len(tiered["steps"]) > 1 else slice(None)
            t_bytes = _mean(tiered["steps"][later], "disk_bytes")
            p_bytes = _mean(plain["steps"][later], "disk_bytes")
            t_s, p_s = _mean(tiered["steps"][later], "seconds"), _mean(plain["steps"][later], "seconds")
            print(f"host tier's effect: {tiered['held_bytes'] / GIB:.1f} GiB held in RAM; per step "
                  f"{t_bytes / GIB:.2f} GiB from the drive in {t_s:.1f} s, against {p_bytes / GIB:.2f} GiB in "
                  f"{p_s:.1f} s streaming everything", flush=True)
        print(json.dumps(summary))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work)


if __name__ == "__main__":
    raise SystemExit(main())
