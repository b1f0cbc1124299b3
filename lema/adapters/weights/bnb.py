"""The bitsandbytes boundary: import it (or name the extra that installs it), read a packed
weight's quantization state, dequantize and quantize weights with bitsandbytes' own routines.

The stored tensors of each format are described in :mod:`lema.domain.nn.quant`. A 4-bit
weight's constants (block size, dtype, shape, double quant's offset) live in a small JSON
tensor; they are read once, on the host (:func:`read_quant_states`), so dequantizing on the
device never waits for a device -> host copy.

Example:
    >>> states = read_quant_states(spec, source)                          # doctest: +SKIP
    >>> w = dequantize(unit.packed[0], tensors, states[(1, unit.packed[0].key)], torch.bfloat16)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
from types import ModuleType
from typing import Any, Mapping

import attrs
import torch

from lema.domain.nn import quant
from lema.domain.nn.quant import PackedWeight, QuantFormat
from lema.domain.model.spec import ModelSpec
from lema.errors import ConfigError, ModelFormatError

EXTRA = "pip install 'lema[quant]'"
# the dtypes a 4-bit quant state's JSON may name (the dense weight's, before quantization)
STORED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=1)
def functional() -> ModuleType:
    """``bitsandbytes.functional``, or a ConfigError naming the extra that installs it."""
    # bitsandbytes logs a warning at import on CPUs with AVX512-BF16 (an optional kernel it cannot
    # fetch); it falls back to its own kernel, so the warning is noise for LEMA's users.
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:
        raise ConfigError(f"quantized weights need the bitsandbytes package ({exc}); install it with {EXTRA}") from None
    finally:
        logger.setLevel(level)
    return bnb_functional


@attrs.frozen
class QuantState:
    """The constants of one packed 4-bit weight (from its JSON tensor), or of an int8 weight."""

    format: QuantFormat
    shape: tuple[int, int]
    blocksize: int = quant.BLOCKSIZE
    nested_blocksize: int = quant.NESTED_BLOCKSIZE
    nested_offset: float = 0.0
    stored_dtype: str = "float32"  # the dtype the weight was quantized from (4-bit): dequantized into it first

    @property
    def torch_stored_dtype(self) -> torch.dtype:
        return STORED_DTYPES[self.stored_dtype]


def parse_quant_state(raw: bytes, name: str, weight: PackedWeight) -> QuantState:
    """Read and check a ``<w>.quant_state.bitsandbytes__<type>`` tensor's JSON.

    Raises:
        ModelFormatError: not JSON, or a type, shape or block size that disagrees with the
            file's other tensors and the config.
    """
    fmt = weight.format
    try:
        state = json.loads(raw.decode("utf-8"))
        stored = str(state.get("dtype", "float32")) if isinstance(state, dict) else "float32"
        if not isinstance(state, dict):
            raise ValueError("not an object")
        shape = tuple(int(s) for s in state["shape"])
        blocksize = int(state["blocksize"])
        nested = (int(state["nested_blocksize"]), float(state["nested_offset"])) if fmt.double_quant else (0, 0.0)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"{name}: not a bitsandbytes quantization state ({exc}); the file is corrupt") from None
    problems = []
    if state.get("quant_type") != fmt.method:
        problems.append(f"quant_type {state.get('quant_type')!r}, the tensor names say {fmt.method!r}")
    if shape != weight.shape:
        problems.append(f"shape {list(shape)}, the config implies {list(weight.shape)}")
    if blocksize != quant.BLOCKSIZE:
        problems.append(f"blocksize {blocksize}, LEMA reads {quant.BLOCKSIZE} (transformers' default)")
    if fmt.double_quant and nested[0] != quant.NESTED_BLOCKSIZE:
        problems.append(f"nested_blocksize {nested[0]}, expected {quant.NESTED_BLOCKSIZE}")
    if stored not in STORED_DTYPES:
        problems.append(f"dtype {stored!r}, bitsandbytes quantizes from {', '.join(sorted(STORED_DTYPES))}")
    if problems:
        raise ModelFormatError(f"{name}: {'; '.join(problems)}")
    return QuantState(fmt, weight.shape, blocksize, nested[0] or quant.NESTED_BLOCKSIZE, nested[1], stored)


def read_quant_states(spec: ModelSpec, source: Any) -> dict[tuple[int, str], QuantState]:
    """Every packed weight's constants, ``(unit index, weight key) -> QuantState``, read once.

    Args:
        spec: the model.
        source: a :class:`~lema.ports.weights.WeightSource` (read without a buffer: only the
            small quantization-state tensors are touched).

    Raises:
        ModelFormatError: a corrupt quantization state, or an int8 weight in a layout other
            than row-major.
    """
    out: dict[tuple[int, str], QuantState] = {}
    for unit in spec.units:
        if not unit.packed:
            continue
        tensors = source.read_unit(unit.index)
        for weight in unit.packed:
            name = next(t.name for t in unit.tensors if t.key == weight.key)
            if weight.format.bits == 8:
                fmt_key = weight.key.removesuffix("weight") + "weight_format"
                if fmt_key in tensors and int(tensors[fmt_key].reshape(-1)[0]) != 0:
                    raise ModelFormatError(f"{name}: int8 weight_format {int(tensors[fmt_key].reshape(-1)[0])} is "
                                           "not row-major (0); re-save the model with a current bitsandbytes")
                out[(unit.index, weight.key)] = QuantState(weight.format, weight.shape)
                continue
            blob = weight.stored[-1]
            raw = tensors[blob].contiguous().view(torch.uint8).numpy().tobytes()
            out[(unit.index, weight.key)] = parse_quant_state(raw, f"{name[: -len(weight.key)]}{blob}", weight)
    return out


def dequantize(weight: PackedWeight, tensors: Mapping[str, torch.Tensor], state: QuantState,
               dtype: torch.dtype, out: torch.Tensor | None = None, offset: torch.Tensor | None = None,
               *, through_stored: bool = False) -> torch.Tensor:
    """The dense ``[out, in]`` weight in ``dtype``, computed where ``tensors`` live.

    4-bit: ``bitsandbytes.functional.dequantize_4bit``, straight into ``dtype`` or, with
    ``through_stored``, into the dtype the weight was quantized from (the quant state's,
    ``state.stored_dtype``) and then cast, as ``dequantize_4bit(B, state).to(dtype)``; the
    two differ only when the stored dtype is not ``dtype`` (bf16 weights computed in fp32,
    fp16 ones in bf16). bitsandbytes' own product uses one or the other in its forward and
    in its backward depending on its version (:func:`roundings`). Written into ``out``
    where bitsandbytes has an in-place kernel (CUDA) and no cast follows; elsewhere into a
    new tensor copied there.
    int8: ``CB * (SCB / 127)`` row by row, in place in ``out``, as bitsandbytes' own
    dequantizing matmul does.

    Args:
        weight: which weight.
        tensors: the unit's stored tensors by key (device views of a slot).
        state: its constants from :func:`read_quant_states`.
        dtype: the compute dtype.
        out: a ``[out, in]`` tensor of ``dtype`` to write into (None: a new tensor).
        offset: double quant's offset as a float32 scalar tensor where ``tensors`` live
            (made once by the caller; None: made here).
        through_stored: 4-bit: dequantize into the stored dtype, then cast (the backward's weight).
    """
    data = tensors[weight.key]
    if weight.format.bits == 8:
        scb = tensors[weight.key.removesuffix("weight") + "SCB"]
        result = out if out is not None else torch.empty(weight.shape, dtype=dtype, device=data.device)
        result.copy_(data)
        return result.mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    bnb_functional = functional()
    key = weight.key
    nested = None
    if weight.format.double_quant:
        nested = bnb_functional.QuantState(absmax=tensors[key + ".nested_absmax"], blocksize=state.nested_blocksize,
                                           code=tensors[key + ".nested_quant_map"], dtype=torch.float32)
        if offset is None:
            offset = torch.tensor(state.nested_offset, dtype=torch.float32, device=data.device)
    into = state.torch_stored_dtype if through_stored else dtype
    qs = bnb_functional.QuantState(absmax=tensors[key + ".absmax"], shape=torch.Size(weight.shape),
                                   code=tensors[key + ".quant_map"], blocksize=state.blocksize,
                                   quant_type=weight.format.method, dtype=into, offset=offset, state2=nested)
    packed = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    if out is not None and out.device.type == "cuda" and into == dtype:
        return bnb_functional.dequantize_4bit(packed, qs, out=out)
    result = bnb_functional.dequantize_4bit(packed, qs)
    if out is None:
        return result.to(dtype)
    return out.copy_(result)


@functools.lru_cache(maxsize=None)
def roundings(stored: torch.dtype, compute: torch.dtype, method: str = "nf4") -> tuple[bool, bool]:
    """``(forward, backward)``: whether the installed bitsandbytes' 4-bit product
    (``bitsandbytes.matmul_4bit``, what ``Linear4bit`` computes with) dequantizes a weight
    quantized from ``stored`` through ``stored`` (True) or straight into ``compute`` (False),
    in its forward and in its backward.

    Versions differ (0.50 dequantizes the forward into the activations' dtype and the
    backward through the quant state's; earlier ones both through the quant state's), so
    it is measured, once per dtype pair, on the CPU: the product of an identity matrix is
    the dequantized weight itself, exactly, in both directions.
    """
    if stored in (compute, torch.float32):  # bitsandbytes' kernels dequantize in fp32: one rounding either way
        return False, False
    bnb_functional = functional()
    import bitsandbytes

    w = (torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 0.05).to(stored)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=quant.BLOCKSIZE, quant_type=method,
                                                 quant_storage=torch.uint8)
    through = bnb_functional.dequantize_4bit(packed, state).to(compute)
    state.dtype = compute
    direct = bnb_functional.dequantize_4bit(packed, state)
    state.dtype = stored
    if torch.equal(through, direct):  # the probe cannot tell them apart: bitsandbytes 0.50's choice
        return False, True
    eye = torch.eye(w.shape[1], dtype=compute, requires_grad=True)
    with torch.enable_grad():
        out = bitsandbytes.matmul_4bit(eye, packed.t(), quant_state=state)
        out.backward(torch.eye(w.shape[1], w.shape[0], dtype=compute))  # rows 0..127 of the gradient: W
    assert eye.grad is not None
    return bool(torch.equal(out.detach().t(), through)), bool(torch.equal(eye.grad[:w.shape[0]], through))


def rounds_twice(state: QuantState, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes' forward and backward products see different roundings of this
    weight computed in ``dtype`` (:func:`roundings`; int8: never)."""
    if state.format.bits != 4:
        return False
    forward, backward = roundings(state.torch_stored_dtype, dtype, state.format.method)
    return forward != backward


def forward_through_stored(state: QuantState, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes' forward product dequantizes this weight through its stored dtype."""
    return state.format.bits == 4 and roundings(state.torch_stored_dtype, dtype, state.format.method)[0]


def quantize(weight: torch.Tensor, key: str, fmt: QuantFormat,
             chunk_elements: int = 1 << 20) -> dict[str, torch.Tensor]:
    """Quantize one ``[out, in]`` weight exactly as transformers + bitsandbytes do when loading
    with ``BitsAndBytesConfig``; returns its stored tensors by in-unit key (keys as in
    :func:`lema.domain.nn.quant.stored_tensors`), on the CPU.

    The 4-bit result depends on the weight's dtype (bitsandbytes records it in the JSON).
    int8 casts to float16 first, as ``Int8Params`` does. The weight is quantized
    ``chunk_elements`` at a time (whole 64-element blocks; whole rows for int8), which gives
    the same bytes as one call (every block is independent; double quantization runs on
    all the scales at once) and keeps bitsandbytes' temporaries, several times the input
    on a CPU, to the chunk's size.
    """
    bnb_functional = functional()
    flat = weight.detach().contiguous().reshape(-1)
    if fmt.bits == 8:
        rows = max(1, chunk_elements // max(1, weight.shape[1]))
        parts = [bnb_functional.int8_vectorwise_quant(weight[i:i + rows].contiguous().to(torch.float16))
                 for i in range(0, weight.shape[0], rows)]
        module = key.removesuffix("weight")
        result = {key: torch.cat([cb.cpu() for cb, _, _ in parts]),
                  module + "SCB": torch.cat([scb.cpu() for _, scb, _ in parts]),
                  module + "weight_format": torch.tensor(0, dtype=torch.uint8)}
        del parts
        _release_free_memory()
        return result
    step = max(quant.BLOCKSIZE, chunk_elements - chunk_elements % quant.BLOCKSIZE)
    packed_parts, absmax_parts = [], []
    for i in range(0, flat.numel(), step):
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(flat[i:i + step], quant.BLOCKSIZE, fmt.method,
                                                                      torch.uint8)
        packed_parts.append(packed.reshape(-1))
        absmax_parts.append(absmax.reshape(-1))
    packed = torch.cat(packed_parts).reshape(-1, 1)
    absmax = torch.cat(absmax_parts)
    # What bitsandbytes.functional.quantize_4bit does with the scales of the whole tensor.
    code = bnb_functional.get_4bit_type(fmt.method, device=flat.device)
    state = bnb_functional.QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=quant.BLOCKSIZE,
                                      code=code, quant_type=fmt.method)
    if fmt.double_quant:
        offset = absmax.mean()
        qabsmax, state2 = bnb_functional.quantize_blockwise(absmax - offset, blocksize=quant.NESTED_BLOCKSIZE)
        state = bnb_functional.QuantState(absmax=qabsmax, shape=weight.shape, dtype=weight.dtype,
                                          blocksize=quant.BLOCKSIZE, code=code, quant_type=fmt.method, offset=offset,
                                          state2=state2)
    out = {key: packed.cpu()}
    for suffix, tensor in state.as_dict(packed=True).items():
        out[f"{key}.{suffix}"] = tensor.detach().cpu().clone()
    del packed_parts, absmax_parts, packed, absmax, state
    _release_free_memory()
    return out


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps freed chunks below its mmap
    threshold: after hundreds of weights' temporaries, a conversion's RSS would grow by the
    allocator's retained free memory, measured at +150 MiB on a 1 GiB model)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
