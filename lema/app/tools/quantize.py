"""Quantize while converting: which tensors a converted file stores for each linear weight,
and writing them as transformers + bitsandbytes would (``lema convert --quantize``).

Each decoder linear weight is cast to the output dtype and quantized on its own with
bitsandbytes (so peak RAM stays near the largest tensor); the stored tensors are those of
:func:`lema.domain.nn.quant.stored_tensors`, bit-identical to what
``AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
keeps and ``save_pretrained`` writes. A 4-bit weight's JSON state goes in the file's tail
(:class:`lema.adapters.weights.safetensors_writer.SafetensorsWriter`): its length depends
on the weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
import torch

from lema.adapters.weights import bnb
from lema.adapters.weights.safetensors_writer import SafetensorsWriter, code_of
from lema.domain.nn import quant
from lema.domain.nn.quant import QuantFormat
from lema.domain.model.spec import ModelSpec, torch_dtype
from lema.errors import ConfigError

Entry = tuple[str, Any, tuple[int, ...]]
# The longest JSON number a float can be (sign, 17 digits, point, exponent): sizes the tail.
_LONGEST_FLOAT = -1.2345678901234567e-308


@attrs.frozen
class QuantizedLayout:
    """What a converted file stores when its linear weights are quantized.

    Attributes:
        entries: ``(name, dtype, shape)`` in file order, every tensor but the tail.
        tail: the 4-bit weights' JSON states, at their largest size.
        weights: dense weight name -> ``(its in-unit key, dtype it is quantized in)``.
        config: the model's config with ``quantization_config`` (and ``dtype``) set.
    """

    entries: tuple[Entry, ...]
    tail: tuple[Entry, ...]
    weights: dict[str, tuple[str, torch.dtype]]
    config: dict[str, Any]


def plan_quantized(spec: ModelSpec, entries: Sequence[Entry], fmt: QuantFormat, source: str) -> QuantizedLayout:
    """Expand the dense ``entries`` of a conversion into the tensors of ``fmt``.

    Args:
        spec: the model as converted (dense; validated).
        entries: ``(name, dtype, shape)`` of every output tensor, in order.
        fmt: the quantization.
        source: the model's name, for messages.

    Raises:
        ConfigError: the model is already quantized, or its family cannot be (GPT-2).
    """
    if spec.quantization is not None:
        raise ConfigError(f"{source} is already quantized ({spec.quantization.label}); convert it without --quantize")
    packed = spec.quantized(fmt)
    keys = {t.name: t.key for u in packed.units for p in u.packed for t in u.tensors if t.key == p.key}
    out: list[Entry] = []
    tail: list[Entry] = []
    weights: dict[str, tuple[str, torch.dtype]] = {}
    dtypes = []
    for name, dtype, shape in entries:
        key = keys.get(name)
        if key is None:
            out.append((name, dtype, tuple(shape)))
            continue
        dt = torch_dtype(code_of(dtype))
        weights[name] = (key, dt)
        dtypes.append(code_of(dtype))
        prefix = name[: -len(key)]
        longest = len(quant.quant_state_json(fmt, shape, code_of(dtype), _LONGEST_FLOAT).encode("utf-8"))
        for i, (k, code, s) in enumerate(quant.stored_tensors(key, shape, fmt, dtype=code_of(dtype))):
            if fmt.bits == 4 and k.endswith("quant_state.bitsandbytes__" + fmt.method):
                tail.append((prefix + k, code, (longest,)))
            else:
                out.append((prefix + k, code, s))
    compute = max(sorted(set(dtypes)), key=dtypes.count) if dtypes else spec.dtype
    config = spec.config
    config["quantization_config"] = fmt.to_config(compute)
    return QuantizedLayout(tuple(out), tuple(tail), weights, config)


def write_quantized(writer: SafetensorsWriter, layout: QuantizedLayout, name: str, tensor: torch.Tensor,
                    fmt: QuantFormat, device: torch.device) -> None:
    """Write one dense weight ``name`` as its quantized tensors (quantized on ``device``)."""
    key, dtype = layout.weights[name]
    prefix = name[: -len(key)]
    weight = tensor.to(device=device, dtype=dtype)
    stored = bnb.quantize(weight, key, fmt)
    del weight
    for k, value in stored.items():
        if k.endswith("quant_state.bitsandbytes__" + fmt.method):
            writer.write_tail(prefix + k, value)
    for k, _, _ in quant.stored_tensors(key, tensor.shape, fmt):
        if k in stored and not k.endswith("quant_state.bitsandbytes__" + fmt.method):
            writer.write(prefix + k, stored[k])


class DequantizedLoader:
    """A quantized checkpoint read as the dense model it stands for (``lema merge`` on a 4-bit base).

    Has a :class:`~lema.adapters.weights.hub.TensorLoader`'s surface (``meta``, ``get``): each
    packed weight appears once, under its own name, with its dense shape and the model's dtype,
    and is dequantized on the host with bitsandbytes when read (in float32); the tensors
    that store it are hidden.

    Args:
        loader: the checkpoint's TensorLoader.
        spec: the checkpoint's spec (with its ``packed`` weights).
    """

    def __init__(self, loader: Any, spec: ModelSpec) -> None:
        self._loader = loader
        self._weights: dict[str, tuple[int, Any, str]] = {}
        stored: set[str] = set()
        for u in spec.units:
            for p in u.packed:
                name = next(t.name for t in u.tensors if t.key == p.key)
                prefix = name[: -len(p.key)]
                self._weights[name] = (u.index, p, prefix)
                stored |= {prefix + k for k in p.stored}
        dense = torch_dtype(spec.dtype)
        self.meta = {n: m for n, m in loader.meta.items() if n not in stored}
        self.meta.update({n: (dense, p.shape) for n, (_, p, _) in self._weights.items()})

    def get(self, name: str) -> torch.Tensor:
        """One tensor; a packed weight dequantized to float32."""
        if name not in self._weights:
            return self._loader.get(name)
        _, weight, prefix = self._weights[name]
        tensors = {k: self._loader.get(prefix + k) for k in weight.stored}
        if weight.format.bits == 8:
            state = bnb.QuantState(weight.format, weight.shape)
        else:
            blob = weight.stored[-1]
            state = bnb.parse_quant_state(tensors[blob].numpy().tobytes(), prefix + blob, weight)
        return bnb.dequantize(weight, tensors, state, torch.float32)


def dequantized_base(names: list[str], loader: Any, config: dict[str, Any]) -> tuple[list[str], Any, dict[str, Any]]:
    """``(names, loader, config)`` of a checkpoint, a quantized one seen as its dense model
    (:class:`DequantizedLoader`, config without ``quantization_config``); others unchanged."""
    header = {n: {"dtype": code_of(d), "shape": list(s)} for n, (d, s) in loader.meta.items()}
    spec = ModelSpec.from_header(header, config)
    if spec.quantization is None:
        return names, loader, config
    dense = DequantizedLoader(loader, spec)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    return [n for n in names if n in dense.meta], dense, config
