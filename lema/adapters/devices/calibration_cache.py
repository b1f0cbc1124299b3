"""The cache of ``lema plan --calibrate``'s measured rates, per machine and device: read by every
plan (without importing torch: ``lema plan`` stays fast), written by
:mod:`lema.adapters.devices.calibrate`."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

from lema.adapters.devices.probe import local_gpu_memory
from lema.domain.device_traits import DeviceTraits
from lema.domain.model.spec import ModelSpec
from lema.domain.plan.inputs import TrainingShape
from lema.domain.plan.items import ModelFacts
from lema.domain.plan.timing import MachineRates

__all__ = ["cache_path", "cached_rates", "device_name", "rates_for", "run_key", "store"]


def cache_path(device_name: str) -> Path:
    """The cache file of this machine and device."""
    root = Path(os.environ.get("LEMA_CACHE") or Path.home() / ".cache" / "lema").expanduser()
    machine = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{platform.node()}-{platform.machine()}-{device_name}")[:120]
    return root / "calibration" / f"{machine}.json"


def device_name(traits: DeviceTraits) -> str:
    """The name a calibration is cached under for a device of these traits on this machine
    ("" when there is no such device here: no local GPU)."""
    if traits.host_memory:
        threads = os.environ.get("OMP_NUM_THREADS", "").strip()
        count = int(threads) if threads.isdigit() and int(threads) > 0 else len(os.sched_getaffinity(0))
        return f"cpu-{platform.processor() or platform.machine()}-{count}threads"
    gpu = local_gpu_memory()
    return "" if gpu is None else gpu[1]


def rates_for(spec: ModelSpec, shape: TrainingShape) -> MachineRates | None:
    """The cached calibration of this run on this machine, or None (the plan's defaults)."""
    from lema.domain.plan.assemble import facts_for

    name = device_name(shape.device)
    if not name:
        return None
    return cached_rates(name, run_key(facts_for(spec, shape), shape.dtype or spec.dtype, shape.batch, shape.seq))


def run_key(f: ModelFacts, dtype: str, batch: int, seq: int) -> str:
    """The shapes a calibration was measured at (another run needs its own); ``v2``: with the
    fixed costs (an older entry, without them, is a miss), which depend on the adapted modules."""
    return (f"v2:{dtype}:b{batch}:s{seq}:h{f.hidden}:q{f.q_dim}:kv{f.kv_dim}:ff{f.ffn}:v{f.vocab}:H{f.n_heads}"
            f":m{len(f.lora_modules)}")


def cached_rates(device_name: str, key: str) -> MachineRates | None:
    """The cached rates of ``key`` on this machine and device, or None."""
    path = cache_path(device_name)
    try:
        if path.stat().st_size > 1 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        entry = data.get(key) if isinstance(data, dict) else None
        return MachineRates.from_dict(entry) if isinstance(entry, dict) else None
    except (OSError, ValueError, Exception):  # a damaged cache is a cache miss  # noqa: BLE001
        return None


def store(device_name: str, key: str, rates: MachineRates) -> Path:
    from lema.adapters.checkpoints.atomic import atomic_write_text

    path = cache_path(device_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[key] = rates.to_dict()
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    return path
