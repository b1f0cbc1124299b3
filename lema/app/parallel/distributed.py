"""Process groups and ranks for data-parallel runs launched by torchrun.

torchrun (``python -m torch.distributed.run``) starts one process per device and tells each
its place through the environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and the rendezvous (``MASTER_ADDR``/``MASTER_PORT``). :func:`start`
initialises the default process group from it for the CLI (NCCL on CUDA, gloo on the CPU,
one ``cuda:LOCAL_RANK`` per process); Python API users initialise it themselves with
``torch.distributed.init_process_group`` and LEMA finds it (:func:`active`).

Example:
    >>> ranks, device = start("auto")   # doctest: +SKIP  (under torchrun: rank, world, "cuda:1")
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import attrs
import torch

from lema.errors import ConfigError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@attrs.frozen
class Ranks:
    """Where this process stands in a run: global and machine-local rank and size."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def from_env(environ: Mapping[str, str] | None = None) -> Ranks:
    """The ranks torchrun set in the environment (one process when it set none).

    Raises:
        ConfigError: a variable that is not a number, or ranks outside their sizes.
    """
    env = os.environ if environ is None else environ
    values = {}
    for name in _ENV:
        text = env.get(name)
        try:
            values[name] = int(text) if text not in (None, "") else None
        except ValueError:
            raise ConfigError(f"environment: {name}={text!r} is not a number; launch with torchrun "
                              "(it sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE)") from None
    world = values["WORLD_SIZE"] or 1
    rank = values["RANK"] or 0
    local_world = values["LOCAL_WORLD_SIZE"] or world
    local_rank = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank % local_world
    if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise ConfigError(f"environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
                          f"LOCAL_WORLD_SIZE={local_world} do not describe a rank of a run; launch with torchrun")
    return Ranks(rank=rank, world=world, local_rank=local_rank, local_world=local_world)


def active() -> bool:
    """True when a process group of more than one rank is initialised (data parallel on)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current() -> Ranks:
    """This process's ranks: from the process group when one is active, else one process."""
    if not active():
        return Ranks()
    dist = torch.distributed
    env = from_env()
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=env.local_rank,
                 local_world=env.local_world)


def local_world_size() -> int:
    """How many ranks torchrun started on this machine (1 outside torchrun)."""
    return from_env().local_world


def default_cuda_index() -> int:
    """The GPU that ``device="cuda"`` means here: ``LOCAL_RANK`` under torchrun, else the
    current CUDA device (what ``torch.cuda.set_device`` chose, 0 by default)."""
    env = from_env()
    if env.distributed:
        return env.local_rank
    return torch.cuda.current_device()


def comm_device() -> torch.device:
    """Where the process group's collectives want their tensors (NCCL: this rank's GPU,
    ``cuda:LOCAL_RANK`` under torchrun, even when the Python API never called ``set_device``)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", default_cuda_index())
    return torch.device("cpu")


def start(device: str) -> tuple[Ranks, str]:
    """Join the run torchrun launched, for the CLI: initialise the default process group
    (NCCL for CUDA, gloo for the CPU) and pick this rank's device.

    Args:
        device: the ``--device`` asked for: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        ``(ranks, device)``: one process and ``device`` unchanged outside torchrun (or with
        one process); else the ranks and ``"cuda:LOCAL_RANK"`` or ``"cpu"``.

    Raises:
        ConfigError: ``cuda:N`` under torchrun, or fewer GPUs than local ranks.
    """
    env = from_env()
    if not env.distributed:
        return env, device
    dist = torch.distributed
    if not dist.is_available():
        raise ConfigError("torchrun started several processes but this torch build has no torch.distributed")
    name = device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if name != "cuda":
            raise ConfigError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; "
                              "pass --device cuda (or auto)")
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if env.local_rank >= visible:
            raise ConfigError(f"torchrun started {env.local_world} processes on this machine but "
                              f"{visible} GPUs are visible; use --nproc-per-node {max(visible, 1)} "
                              "(or --device cpu)")
        torch.cuda.set_device(env.local_rank)
        name, backend = f"cuda:{env.local_rank}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        atexit.register(_stop)
    return current(), name


# -- the collectives LEMA issues (every one goes through these, so a test can count them) ----

_observers: list[Callable[[str, bool], None]] = []


@contextmanager
def observe_collectives(callback: Callable[[str, bool], None]) -> Iterator[None]:
    """Call ``callback(name, blocking)`` for each collective this process issues while the
    block runs (``blocking``: the host waits for it where it is issued; an asynchronous one
    is waited for later, after work it overlaps)."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def _issued(name: str, blocking: bool) -> None:
    for callback in list(_observers):
        callback(name, blocking)


def all_reduce(tensor: torch.Tensor, async_op: bool = False) -> Any:
    """``torch.distributed.all_reduce`` (sum); with ``async_op`` its work handle."""
    _issued("all_reduce", not async_op)
    return torch.distributed.all_reduce(tensor, async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int) -> None:
    """``torch.distributed.broadcast``, waited for."""
    _issued("broadcast", True)
    torch.distributed.broadcast(tensor, src=src)


def all_gather(out: list[torch.Tensor], tensor: torch.Tensor) -> None:
    """``torch.distributed.all_gather``, waited for."""
    _issued("all_gather", True)
    torch.distributed.all_gather(out, tensor)


def _stop() -> None:
    dist = torch.distributed
    if dist.is_initialized():
        dist.destroy_process_group()
