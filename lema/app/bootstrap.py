"""The composition root: turn a LemaConfig into a spec, a plan, a device, a source, an engine.

The Python API (:class:`lema.LemaModel`) and the CLI both build their objects here, so
there is one place that knows which adapter serves which port.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch

from lema.adapters.devices.cuda_sizing import reader_count
from lema.adapters.devices.host_cpus import fit_torch_threads, usable_cpus
from lema.adapters.weights.model_files import ResolvedModel, resolve_model
from lema.app.parallel.distributed import default_cuda_index, from_env, local_world_size
from lema.config import LemaConfig
from lema.domain.device_traits import DeviceTraits
from lema.domain.model.spec import ModelSpec, dtype_code
from lema.domain.plan.planner import Budget, MemoryPlan, TrainingShape, plan
from lema.domain.plan.disk_time import DiskTime
from lema.domain.plan.strategy import MemoryStrategy
from lema.errors import ConfigError, HostMemoryError, LemaWarning, ModelFormatError, PinningRefused
from lema.ports.device import Device
from lema.ports.host_memory import HostMemory
from lema.ports.metrics import MetricsSink
from lema.ports.weights import WeightSource


def weight_readers() -> int:
    """Reader threads per unit when streaming to a GPU: one per core this process may use,
    less the compute's and the prefetch thread's, within 2..16 (an NVMe queue wants several
    requests in flight; see :func:`~lema.adapters.devices.cuda_sizing.reader_count`)."""
    return reader_count(usable_cpus())


def disk_readers() -> int:
    """Reader threads per unit when the model streams from the drive: at least 4 in flight keep
    a drive busy (the threads wait on the drive, not on the cores)."""
    return max(4, weight_readers())


def open_model(config: LemaConfig) -> ResolvedModel:
    """Find the weights and config a LemaConfig names, reading only headers.

    ``gbi_path`` wins; its config comes from the file's metadata, else a ``config.json``
    beside it, else ``model_name_or_path`` when that is a local folder holding one.
    """
    if config.gbi_path is not None:
        config_path = None
        if config.model_name_or_path and (Path(config.model_name_or_path) / "config.json").is_file():
            config_path = str(Path(config.model_name_or_path) / "config.json")
        resolved = resolve_model(str(config.gbi_path), config_path=config_path, allow_network=False)
    else:
        resolved = resolve_model(str(config.model_name_or_path), allow_network=False)
    if resolved.weights_path is None:
        raise ModelFormatError(
            f"{config.gbi_path or config.model_name_or_path}: no safetensors weights; convert the model first "
            "with `lema convert MODEL OUT.safetensors` and pass OUT.safetensors"
        )
    check_rope(resolved.spec)
    return resolved


def check_rope(spec: ModelSpec) -> None:
    """Compute every rotary table's frequencies once, so settings the math cannot use
    (a ``llama3`` scaling without its keys, say) stop here, not at the first step.

    The config's types are checked when the spec is built; the family refuses rope types
    it does not implement by name.
    """
    from lema.domain.families import registry
    from lema.domain.nn.rope import inv_freq

    for _, rope in registry.params_of(spec).layout.ropes:
        try:
            inv_freq(rope, 0)
        except Exception as exc:  # noqa: BLE001 - a malformed setting raises KeyError, TypeError, ValueError, ...
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ModelFormatError(f"config.json: the rotary embedding settings (rope_scaling / rope_parameters) are "
                                   f"not usable: {detail}; fix them or use the model's own config.json") from None


def make_device(config: LemaConfig) -> Device:
    """The device a config asks for: CUDA when available for "auto", else the CPU."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    fit_torch_threads()  # the CPU the compute may use (a container's quota), whatever the device
    adapter, _, index = name.partition(":")
    return _DEVICES[adapter](config, index)


def _cpu_device(config: LemaConfig, index: str) -> Device:
    from lema.adapters.devices.cpu import CpuDevice

    # The compute's allocations are counted (a Python call per op) only when a budget
    # must be enforced; otherwise the step runs free and its report says what it counted.
    # With a budget the CPU stands in for a smaller device (weights go through counted
    # slots); without one it trains for real, on the weights where the host holds them.
    return CpuDevice(capacity=config.vram_bytes, direct_reads=True, record_timeline=False,
                     in_place=config.vram_bytes is None)


def _cuda_device(config: LemaConfig, index: str) -> Device:
    from lema.adapters.devices.cuda import CudaDevice

    # "cuda" is this rank's GPU under torchrun (cuda:LOCAL_RANK), else the current device.
    available = torch.cuda.is_available()
    gpu = int(index) if index else (default_cuda_index() if available else 0)
    if not available or gpu >= torch.cuda.device_count():
        raise ConfigError(f"device: {config.device!r} but CUDA is not available here "
                          f"({torch.cuda.device_count()} GPUs visible); use device='cpu'")
    # Without a budget, plan against what is free on the card (the device measures it at start).
    return CudaDevice(index=gpu, capacity=config.vram_bytes, ranks=from_env().world)


# The adapter each device name of LemaConfig.device builds (a new device: one entry here).
_DEVICES: dict[str, Callable[[LemaConfig, str], Device]] = {"cpu": _cpu_device, "cuda": _cuda_device}


def compute_dtype(config: LemaConfig, spec: ModelSpec, traits: DeviceTraits | None = None, *,
                  warn: bool = False) -> torch.dtype:
    """The dtype the base weights compute in: the file's unless the config says otherwise, and
    bfloat16 for a float16 file on a device with native bf16 (:mod:`lema.domain.model.precision`).

    Args:
        traits: the device's (None: the CPU's).
        warn: emit the choice's warning (a float16 run) as a :class:`LemaWarning`.
    """
    from lema.domain.device_traits import CPU
    from lema.domain.model.precision import compute_dtype_code
    from lema.domain.model.spec import torch_dtype

    code, warning = compute_dtype_code(spec.dtype, config.dtype, bf16=(traits or CPU).bf16)
    if warn and warning is not None:
        warnings.warn(LemaWarning(warning), stacklevel=3)
    return torch_dtype(code)


def training_shape(config: LemaConfig, spec: ModelSpec, device: Device) -> TrainingShape:
    """The shape the memory plan is checked for."""
    return TrainingShape(
        batch=config.batch_size, seq=config.max_seq_len, lora_rank=config.lora_rank,
        lora_targets=config.lora_target_modules, strategy=config.strategy,
        prefetch=config.prefetch, prefetch_auto=config.prefetch_auto, dtype=_planned_dtype(config, spec, device),
        gradient_checkpointing=config.checkpointing, device_kind=device.traits.kind,
        offload_activations=config.offload if config.checkpointing else False,
        kept_layers=None if config.gradient_checkpointing == "auto" and config.strategy is MemoryStrategy.AUTO else 0,
        wide_matmul=device.matmul_dtype(compute_dtype(config, spec, device.traits)) is not None,
        local_ranks=local_world_size(), weights_in_place=device.traits.in_place, preference=config.preference,
        reserve_bytes=device.traits.runtime_reserve,  # the device's own (CUDA: sized for this run)
        block_sparse=bool(config.packed_rows) or windowed_attention(spec, config.max_seq_len),
    )


def windowed_attention(spec: ModelSpec, seq: int) -> bool:
    """Whether ``seq``-long rows run a sliding window shorter than themselves (attention by
    bands, which the plan counts: :func:`lema.domain.plan.stages.block_sparse_attention`)."""
    from lema.domain.families import registry
    from lema.domain.nn.layout import SLIDING

    layout = registry.params_of(spec).layout
    return SLIDING in layout.layer_types and layout.sliding_window is not None and layout.sliding_window < seq


def _planned_dtype(config: LemaConfig, spec: ModelSpec, device: Device) -> str | None:
    """The plan's compute dtype: None for the file's own (``dtype="auto"`` computing in it)."""
    code = dtype_code(compute_dtype(config, spec, device.traits))
    return None if config.dtype == "auto" and code == dtype_code(spec.dtype) else code


def check_host_memory(config: LemaConfig, plan_: MemoryPlan, device: Device,
                      host_memory: HostMemory | None = None) -> None:
    """Refuse, before anything loads, a run needing more host RAM than is available.

    The RAM available is ``host_memory``'s (default: :class:`~lema.adapters.host_memory.ProcMeminfo`,
    the running system), or the config's ``ram_budget`` when smaller.

    Raises:
        HostMemoryError: one line naming the host RAM the run needs and the RAM there is.
    """
    from lema.adapters.host_memory import ProcMeminfo
    from lema.domain.plan.host_fit import host_ram_needed, host_shortfall

    memory = host_memory if host_memory is not None else ProcMeminfo()
    available, where = memory.available_bytes(), memory.describe()
    if config.ram_bytes is not None and config.ram_bytes < available:
        available, where = config.ram_bytes, "ram_budget"
    line = host_shortfall(plan_, device.traits.host_memory, available, where)
    if line is not None:
        raise HostMemoryError(line, host_ram_needed(plan_, device.traits.host_memory), available)


def make_plan(config: LemaConfig, spec: ModelSpec, device: Device, mode: str = "train") -> MemoryPlan:
    """Plan the run against the config's budget (or the device's capacity)."""
    shape = attrs.evolve(training_shape(config, spec, device), mode=mode)
    capacity = config.vram_bytes if config.vram_bytes is not None else device.capacity
    budget = None if capacity is None else Budget(device_bytes=capacity, host_bytes=config.ram_bytes)
    rates = None
    if shape.kept_layers is None or shape.prefetch_auto:  # AUTO chooses by time: this machine's calibration
        from lema.adapters.devices.calibration_cache import rates_for
        from lema.domain.plan.timing import default_rates

        rates = rates_for(spec, shape)
        link = device.link_bandwidth  # known: simulated on the CPU, measured on CUDA
        if link:
            rates = attrs.evolve(rates or default_rates(shape.device, shape.dtype or spec.dtype),
                                 link_bytes_per_s=float(link), link_pageable_bytes_per_s=float(link))
    return plan(spec, shape, budget, rates)


def make_source(strategy: MemoryStrategy, resolved: ResolvedModel, device: Device | None = None,
                disk: "DiskTime | None" = None) -> WeightSource:
    """RESIDENT loads every layer into RAM once; STREAMING and AUTO read the file per pass.

    RESIDENT on a device that uploads from page-locked memory (CUDA) loads the weights
    straight into pinned buffers, one per unit, so every step's uploads are pure DMA; when
    the system refuses to pin that much, it warns once (naming the limit) and keeps them
    in ordinary RAM, uploaded through the staging buffers. STREAMING reads each unit with a
    small pool of threads when the device is a GPU (on the CPU the cores are the compute's).

    With several ranks on this machine (torchrun), RESIDENT maps the file instead: its pages
    sit once in the OS page cache, shared by every local rank, rather than one private (or
    pinned) copy per rank; on CUDA they then go through the staging buffers.
    """
    from lema.adapters.weights.resident_source import ResidentSource, ram_buffer
    from lema.adapters.weights.safetensors_source import SafetensorsSource

    if resolved.root is None:
        raise ConfigError("internal: a weight source needs a model root folder")
    pool = device is not None and not device.traits.host_memory  # the host's cores are free to read
    if strategy is MemoryStrategy.RESIDENT:
        if local_world_size() > 1:
            return ResidentSource.shared_from_safetensors(resolved.spec, resolved.root)
        if device is not None and not device.traits.direct_reads:
            try:
                return ResidentSource.from_safetensors(resolved.spec, resolved.root, allocate=device.pinned_buffer,
                                                       pinned=True)
            except PinningRefused as exc:
                warnings.warn(LemaWarning(f"RESIDENT weights stay in pageable RAM and go through staging "
                                          f"buffers: {exc}"), stacklevel=2)
        return ResidentSource.from_safetensors(resolved.spec, resolved.root, allocate=ram_buffer)
    if disk is not None and disk.keep is not None:
        # From the drive: several reads in flight keep it busy (the threads wait on the
        # drive, not on the cores), and the file's pages beyond LEMA's share are dropped.
        stream = SafetensorsSource(resolved.spec, resolved.root, readers=disk_readers(), keep_bytes=disk.keep)
        if not disk.held:
            return stream
        from lema.adapters.weights.tiered_source import TieredSource

        try:  # AUTO's host tier: the planned units read once into host RAM, pinned where the device can
            if device is not None and not device.traits.direct_reads:
                return TieredSource.hold(stream, disk.held, device.pinned_buffer, pinned=True, fallback=ram_buffer)
            return TieredSource(stream, disk.held, ram_buffer)
        except BaseException:
            stream.close()
            raise
    return SafetensorsSource(resolved.spec, resolved.root, readers=weight_readers() if pool else 1)


def plan_disk(config: LemaConfig, spec: ModelSpec, resolved: ResolvedModel, plan_: MemoryPlan, device: Device,
              host_memory: HostMemory | None = None, measure: bool = True) -> "DiskTime | None":
    """What the drive costs each step of a streamed run (None: RESIDENT, or no local file).

    When the streamed units do not fit the RAM the run may use (what is available, or the
    config's ``ram_budget`` when smaller), the drive's read rate is taken from the cache or
    measured on the model's own file (:mod:`lema.adapters.weights.read_rate`;
    ``measure=False``: cache only), the steady state's reads simulated and, for AUTO, the
    units that fit held in host RAM (:mod:`lema.app.disk_plan`).
    """
    from lema.adapters.host_memory import ProcMeminfo
    from lema.app.disk_plan import disk_for, drive_rate, probe_file, ram_the_run_may_use

    if config.strategy is MemoryStrategy.RESIDENT or resolved.weights_path is None or resolved.root is None:
        return None
    memory = host_memory if host_memory is not None else ProcMeminfo()
    available = ram_the_run_may_use(memory.available_bytes(), config.ram_bytes)
    probe = probe_file(spec, resolved.weights_path, resolved.root)
    return disk_for(spec, plan_, config.strategy, in_place=device.traits.in_place,
                    host_memory_device=device.traits.host_memory, available=available,
                    rate=lambda: drive_rate(probe, measure))


REPORT_TO = ("none", "tensorboard", "wandb")
_SINK_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def sink_names(report_to: str | Sequence[str] | None) -> list[str]:
    """The sinks ``--report-to`` names (comma-separated; ``none``: no sink besides
    ``metrics.jsonl``), checked before a run starts.

    Raises:
        ConfigError: an unknown name.
        MissingDependencyError: the library of a named sink is not installed.
    """
    import importlib.util

    from lema.errors import missing_extra

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = list(dict.fromkeys(n.strip() for name in names for n in name.split(",") if n.strip()))
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"--report-to: {', '.join(map(repr, unknown))} is not one of {', '.join(REPORT_TO)}")
    for name in names:
        if name in _SINK_PACKAGES:
            package, extra = _SINK_PACKAGES[name]
            try:
                found = importlib.util.find_spec(package) is not None
            except (ImportError, ValueError):  # a package set to None in sys.modules, or half-installed
                found = False
            if not found:
                raise missing_extra(package, extra, f"--report-to {name}")
    return [n for n in names if n != "none"]


def make_sinks(report_to: str | Sequence[str] | None, out: Path, *, run_name: str | None = None,
               options: Mapping[str, Any] | None = None) -> list[MetricsSink]:
    """The metrics sinks :func:`sink_names` accepts: TensorBoard event files in
    ``out/tensorboard``, a wandb run under ``out/wandb``."""
    sinks: list[MetricsSink] = []
    for name in sink_names(report_to):
        if name == "tensorboard":
            from lema.adapters.reporting.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(out / "tensorboard", hparams=options))
        elif name == "wandb":
            from lema.adapters.reporting.wandb import WandbSink

            sinks.append(WandbSink(out, project=os.environ.get("WANDB_PROJECT") or "lema",
                                   name=run_name or out.name, config=options))
    return sinks
