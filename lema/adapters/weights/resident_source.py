"""ResidentSource: every base weight held in host RAM (the RESIDENT strategy).

Also the reference fake of the weight-source contract tests (like Hypothesis's
``InMemoryExampleDatabase``): a plain dict of tensors per unit.

Example:
    >>> src = ResidentSource.from_safetensors(spec, "/models/tiny")   # doctest: +SKIP
    >>> src.read_unit(1)["mlp.up_proj.weight"].shape                   # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import torch

from lema.domain.model.spec import ModelSpec, torch_dtype
from lema.domain.schedule.layer_schedule import unit_buffer_bytes, unit_layout
from lema.errors import ConfigError, ModelFormatError


class ResidentSource:
    """A :class:`~lema.ports.weights.WeightSource` over tensors already in RAM.

    Args:
        spec: the model.
        tensors_by_unit: unit index -> {TensorSpec.key: tensor} for every unit of ``spec``.

    Raises:
        ModelFormatError: a unit or tensor is missing, or has the wrong dtype or shape
            (all offenders listed).
    """

    def __init__(self, spec: ModelSpec, tensors_by_unit: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        problems = []
        for unit in spec.units:
            given = tensors_by_unit.get(unit.index, {})
            for t in unit.tensors:
                tensor = given.get(t.key)
                if tensor is None:
                    problems.append(f"unit {unit.index} misses {t.key}")
                elif tensor.dtype != torch_dtype(t.dtype) or tuple(tensor.shape) != t.shape:
                    problems.append(f"{t.name} is {tensor.dtype}{list(tensor.shape)}, spec says "
                                    f"{t.dtype}{list(t.shape)}")
        if problems:
            raise ModelFormatError(f"resident weights do not match the model: {'; '.join(problems[:8])}")
        self.spec = spec
        self._units = {u.index: {t.key: tensors_by_unit[u.index][t.key].contiguous() for t in u.tensors}
                       for u in spec.units}
        self._layouts = {u.index: unit_layout(u) for u in spec.units}

    @classmethod
    def from_state_dict(cls, spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> "ResidentSource":
        """From file tensor names -> tensors (as ``safetensors.torch.load_file`` returns)."""
        missing = sorted({t.name for u in spec.units for t in u.tensors} - set(state_dict))
        if missing:
            raise ModelFormatError(f"state dict misses {len(missing)} tensor(s), e.g. {missing[0]}")
        return cls(spec, {u.index: {t.key: state_dict[t.name] for t in u.tensors} for u in spec.units})

    @classmethod
    def load(cls, source: object) -> "ResidentSource":
        """Copy every unit of another weight source into RAM, once per distinct tensor.

        Tied tensors (one file name in two units) are held once.
        """
        from lema.ports.weights import WeightSource

        if not isinstance(source, WeightSource):
            raise ConfigError(f"source: {type(source).__name__} is not a WeightSource")
        spec = source.spec
        read_tensor = getattr(source, "read_tensor", None)
        by_name: dict[str, torch.Tensor] = {}
        units: dict[int, dict[str, torch.Tensor]] = {}
        for unit in spec.units:
            shared = None
            units[unit.index] = {}
            for t in unit.tensors:
                if t.name not in by_name:
                    if read_tensor is not None:
                        by_name[t.name] = read_tensor(t)
                    else:
                        shared = shared if shared is not None else source.read_unit(unit.index)
                        by_name[t.name] = shared[t.key].clone()
                units[unit.index][t.key] = by_name[t.name]
        return cls(spec, units)

    @classmethod
    def from_safetensors(cls, spec: ModelSpec, root: str | os.PathLike[str]) -> "ResidentSource":
        """Load a safetensors model (file or sharded folder) into RAM with positional reads."""
        from lema.adapters.weights.safetensors_source import SafetensorsSource

        with SafetensorsSource(spec, root) as source:
            return cls.load(source)

    def read_unit(self, index: int, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :meth:`lema.ports.weights.WeightSource.read_unit` (no buffer: the RAM tensors)."""
        if index not in self._units:
            raise IndexError(f"unit {index} out of range 0..{len(self.spec.units) - 1}")
        tensors = self._units[index]
        if buffer is None:
            return dict(tensors)
        need = unit_buffer_bytes(self.spec.units[index])
        if buffer.dtype != torch.uint8 or buffer.numel() < need or buffer.device.type != "cpu":
            raise ConfigError(f"buffer: needs a CPU uint8 tensor of at least {need} bytes for unit {index}")
        out = {}
        raw = buffer.numpy()
        for t, offset in self._layouts[index]:
            src = tensors[t.key].contiguous().view(-1).view(torch.uint8).numpy()
            # One plain memcpy that releases the GIL; torch's copy_ would fan out over the
            # intra-op thread pool and fight the compute for the same cores.
            np.copyto(raw[offset:offset + t.nbytes], src)
            out[t.key] = buffer[offset:offset + t.nbytes].view(torch_dtype(t.dtype)).view(t.shape)
        return out

    @property
    def nbytes(self) -> int:
        """Host bytes held (tied tensors once)."""
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for unit in self._units.values() for t in unit.values()}
        return sum(seen.values())

    def close(self) -> None:
        """Nothing to release; the tensors go with the object."""
