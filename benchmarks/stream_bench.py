"""Stream a ~1 GB Llama-shaped bf16 model through the engine and compare with a plain read.

Prints, for a warm and a cold (dropped) page cache, the GB/s of:

* ``plain read``: ``f.readinto`` of the whole file into one pre-touched buffer (the floor
  the streaming path is measured against, taken in the same run);
* ``source <method>``: ``read_unit`` of every streamed unit into one staging buffer
  (the weight source alone);
* ``engine <method>``: a full forward pass of the engine with a no-op compute (source
  reads on the prefetch thread, uploads on the device's link, slot bookkeeping);

and the ratio of each to the plain read. ``--device cuda`` uploads into GPU slots through
pinned staging and also reports a pinned host -> device copy baseline.

Usage:
    python benchmarks/stream_bench.py [--path DIR] [--layers 8] [--device cpu|cuda] [--prefetch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def model_config(args: argparse.Namespace) -> dict:
    return {"model_type": "llama", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
            "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": args.intermediate,
            "vocab_size": args.vocab, "max_position_embeddings": 2048, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def write_model(folder: Path, config: dict) -> Path:
    """Write random bf16 weights once (tensor by tensor is not possible with save_file; ~1 GB RAM)."""
    from safetensors.torch import save_file

    from lema.domain.model.spec import ModelSpec

    path = folder / "model.safetensors"
    if path.exists() and json.loads((folder / "config.json").read_text()) == config:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec.from_config(config, dtype="BF16")
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for unit in spec.units:
        for t in unit.tensors:
            if t.name not in tensors:
                raw = torch.randint(0, 256, (t.nbytes,), dtype=torch.uint8, generator=gen)
                tensors[t.name] = raw.view(torch.bfloat16).view(t.shape)
    save_file(tensors, str(path), metadata={"config": json.dumps(config)})
    (folder / "config.json").write_text(json.dumps(config))
    return path


def drop_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (no root needed for clean pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def plain_read(path: Path, buffer: torch.Tensor) -> tuple[int, float]:
    from lema.adapters.weights.safetensors_source import byte_view

    view = byte_view(buffer, 0, buffer.numel())
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            total += n
    return total, time.perf_counter() - start


def source_read(spec, root: Path, method: str, staging: torch.Tensor) -> tuple[int, float]:
    from lema.adapters.weights.safetensors_source import SafetensorsSource
    from lema.domain.schedule.slot_layout import unit_buffer_bytes

    with SafetensorsSource(spec, root, method=method) as source:
        start = time.perf_counter()
        total = 0
        for unit in spec.units[1:]:
            source.read_unit(unit.index, staging)
            total += unit_buffer_bytes(unit)
        return total, time.perf_counter() - start


def engine_pass(engine, device) -> tuple[int, float, float]:
    start = time.perf_counter()
    report = engine.run(lambda phase, unit, weights: None, mode="forward")
    device.synchronize()
    return report.bytes_uploaded, time.perf_counter() - start, report.wait_seconds


def h2d_copy(device, nbytes: int, repeat: int) -> tuple[int, float]:
    host = device.host_buffer(nbytes)
    slot = device.alloc(nbytes, "bench")
    device.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        device.upload(host, slot, nbytes).wait()
    device.synchronize()
    elapsed = time.perf_counter() - start
    device.free(slot)
    return nbytes * repeat, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()) / "lema-stream-bench")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)

    from lema.adapters.weights.safetensors_header import read_header
    from lema.domain.model.spec import ModelSpec
    from lema.domain.schedule.slot_layout import slot_bytes

    config = model_config(args)
    path = write_model(args.path, config)
    spec = ModelSpec.from_header(read_header(path).tensors, config)
    size = path.stat().st_size

    if args.device == "cuda":
        from lema.adapters.devices.cuda import CudaDevice

        make_device = CudaDevice
    else:
        from lema.adapters.devices.cpu import CpuDevice

        # As `LemaModel` builds it: weights read straight into the slots (no staging copy).
        def make_device():
            return CpuDevice(direct_reads=True, count_compute=False)
    device = make_device()
    staging = device.host_buffer(slot_bytes(spec.units[1:]))
    big = device.host_buffer(size)  # pre-touched, like the engine's staging

    from lema.adapters.weights.safetensors_source import SafetensorsSource
    from lema.app.runtime.engine import Engine

    # Built once, like a training run: slots and staging are allocated and touched here.
    sources = {m: SafetensorsSource(spec, args.path, method=m) for m in ("pread", "mmap")}
    engines = {m: Engine(spec, s, device, prefetch=args.prefetch) for m, s in sources.items()}
    rows: list[dict] = []

    def measure(name: str, cache: str, fn) -> None:
        rates, waits = [], []
        for _ in range(args.repeat):
            if cache == "cold":
                drop_cache(path)
            else:
                warm_cache(path)
            result = fn()
            rates.append(result[0] / result[1] / 1e9)
            if len(result) > 2:
                waits.append(result[2])
        row = {"what": name, "cache": cache, "GB/s": statistics.median(rates), "runs": [round(r, 2) for r in rates]}
        if waits:
            row["wait_s"] = round(statistics.median(waits), 3)
        rows.append(row)

    for cache in ("warm", "cold"):
        measure("plain read (readinto)", cache, lambda: plain_read(path, big))
        for method in ("pread", "mmap"):
            measure(f"source {method}", cache, lambda m=method: source_read(spec, args.path, m, staging))
            engine = engines[method]
            measure(f"engine {method} (prefetch {args.prefetch}, {args.device})", cache,
                    lambda e=engine: engine_pass(e, device))
    if args.device == "cuda":
        measure("pinned H2D copy (largest unit)", "n/a", lambda: h2d_copy(device, slot_bytes(spec.units[1:]), 10))

    print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.intermediate}, vocab {args.vocab}, "
          f"bf16; file {size / 1e9:.2f} GB; streamed per pass {sum(u.nbytes for u in spec.units[1:]) / 1e9:.2f} GB")
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, device {args.device}")
    base = {r["cache"]: r["GB/s"] for r in rows if r["what"].startswith("plain read")}
    print(f"{'measurement':44s} {'cache':5s} {'GB/s':>7s} {'vs plain':>9s}  runs")
    for r in rows:
        ratio = r["GB/s"] / base[r["cache"]] if r["cache"] in base else float("nan")
        r["ratio"] = round(ratio, 3)
        extra = f"  wait {r['wait_s']}s" if "wait_s" in r else ""
        print(f"{r['what']:44s} {r['cache']:5s} {r['GB/s']:7.2f} {ratio:9.2f}  {r['runs']}{extra}")
    if args.json:
        print(json.dumps(rows, indent=1))
    for m in engines:
        engines[m].close()
        sources[m].close()
    device.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
