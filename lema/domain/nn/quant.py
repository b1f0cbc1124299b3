"""Quantized base weights as transformers + bitsandbytes save them: NF4/FP4 (4-bit) and int8 (pure).

A linear weight ``W [out, in]`` of a decoder layer is stored *packed*: as several tensors
under names derived from the weight's own (``self_attn.q_proj.weight`` here), which stream
to the device as they are and are dequantized there into ``W`` (see
:mod:`lema.adapters.devices.dequantize`). Everything else (embeddings, the head, norms,
biases) stays dense. This module only describes the stored tensors; bitsandbytes itself is
never imported here.

4-bit (``load_in_4bit``; ``n = out * in`` elements, blocks of 64 consecutive elements of
the row-major flattened weight, ``b = ceil(n / 64)`` blocks)::

    <w>                                  U8  [(n + 1) // 2, 1]  two 4-bit codes per byte
    <w>.absmax                           F32 [b]                block scales (U8 [b] with double quant)
    <w>.quant_map                        F32 [16]               the NF4 or FP4 code book
    <w>.nested_absmax                    F32 [ceil(b / 256)]    double quant only
    <w>.nested_quant_map                 F32 [256]              double quant only
    <w>.quant_state.bitsandbytes__nf4    U8  [json bytes]       blocksize, dtype, shape, nested offset

int8 (``load_in_8bit``, LLM.int8 row-wise absmax; ``<m>`` is the module, ``<w> = <m>.weight``)::

    <w>                  I8  [out, in]
    <m>.SCB              F32 [out]     row scales: W = CB * SCB / 127
    <m>.weight_format    U8  []        0: row-major (optional)

Bytes per parameter, all tensors counted: NF4/FP4 0.5625, with double quant about 0.516,
int8 about 1.0 (a 16-bit weight: 2).

Example:
    >>> fmt = QuantFormat.parse("nf4")
    >>> [(k, code, shape) for k, code, shape in stored_tensors("mlp.up_proj.weight", (128, 64), fmt)][:2]
    [('mlp.up_proj.weight', 'U8', (4096, 1)), ('mlp.up_proj.weight.absmax', 'U8', (128,))]
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import attrs

from lema.domain.nn.layout import ExpectedTensor
from lema.errors import ConfigError, ModelFormatError

METHODS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # transformers' BitsAndBytesConfig has no blocksize option: bitsandbytes' default
NESTED_BLOCKSIZE = 256
_BLOB = "quant_state.bitsandbytes__"
# dtype codes -> the names bitsandbytes writes into a quant state's JSON ("dtype": "bfloat16")
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# bnb_4bit_quant_storage dtypes the packed 4-bit data may be stored as (its bytes are what count)
_ITEMSIZE = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4}


@attrs.frozen
class QuantFormat:
    """How linear weights are quantized.

    Attributes:
        method: ``"nf4"``, ``"fp4"`` (4-bit) or ``"int8"``.
        double_quant: 4-bit only: the block scales are themselves quantized to 8 bits
            (QLoRA's double quantization, ``bnb_4bit_use_double_quant``).
    """

    method: str
    double_quant: bool = False

    def __attrs_post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"quantize: {self.method!r} is not a quantization; use nf4, fp4 or int8")
        if self.method == "int8" and self.double_quant:
            raise ConfigError("quantize: double quantization applies to nf4 and fp4 only, not int8")

    @classmethod
    def parse(cls, method: str, double_quant: bool = True) -> "QuantFormat":
        """``"nf4"`` / ``"fp4"`` (double quant unless told otherwise, as QLoRA) or ``"int8"``."""
        name = str(method).strip().lower()
        return cls(name, double_quant and name != "int8")

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    @property
    def label(self) -> str:
        """``"NF4 + double quant"``, ``"FP4"``, ``"int8"``."""
        return self.method.upper() + (" + double quant" if self.double_quant else "") if self.bits == 4 else "int8"

    def to_config(self, compute_dtype: str) -> dict[str, Any]:
        """The ``quantization_config`` of ``config.json``, as ``BitsAndBytesConfig(...).to_dict()``.

        Args:
            compute_dtype: a dtype code (``"BF16"``): ``bnb_4bit_compute_dtype``.
        """
        four = self.bits == 4
        return {
            "_load_in_4bit": four, "_load_in_8bit": not four,
            "bnb_4bit_compute_dtype": _DTYPE_NAMES.get(compute_dtype, "float32") if four else "float32",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.method if four else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "load_in_4bit": four, "load_in_8bit": not four, "quant_method": "bitsandbytes",
        }


@attrs.frozen
class PackedWeight:
    """One linear weight of a unit stored packed.

    Attributes:
        key: the dense weight's in-unit key (``self_attn.q_proj.weight``).
        shape: the dense ``[out, in]`` shape.
        format: how it is quantized.
        stored: the in-unit keys of the tensors it is stored as, the packed data first.
    """

    key: str
    shape: tuple[int, int]
    format: QuantFormat
    stored: tuple[str, ...]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def blocks(self) -> int:
        """Scale blocks (4-bit: 64 elements each; int8: one per row)."""
        return self.shape[0] if self.format.bits == 8 else -(-self.numel // BLOCKSIZE)


def unsupported(quantization_config: Any) -> str | None:
    """Why a ``quantization_config`` cannot be read (None: a bitsandbytes 4-bit or 8-bit one)."""
    qc = quantization_config
    if not isinstance(qc, Mapping):
        return "is not an object"
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        return ("is not supported; LEMA reads bitsandbytes NF4, FP4 and int8 checkpoints "
                "(load_in_4bit / load_in_8bit), or use the unquantized model")
    if qc.get("load_in_4bit"):
        kind = str(qc.get("bnb_4bit_quant_type") or "fp4").lower()
        return None if kind in ("nf4", "fp4") else f"has bnb_4bit_quant_type {kind!r}, not nf4 or fp4"
    if qc.get("load_in_8bit"):
        if qc.get("llm_int8_has_fp16_weight"):
            return ("keeps 16-bit weights (llm_int8_has_fp16_weight), not int8 ones; LEMA reads the int8 "
                    "checkpoints load_in_8bit writes")
        return None
    return "sets neither load_in_4bit nor load_in_8bit"


def format_of(config: Mapping[str, Any]) -> QuantFormat | None:
    """The quantization a ``config.json`` declares (``quantization_config``), or None.

    Raises:
        ModelFormatError: a quantization other than bitsandbytes 4-bit / 8-bit (:func:`unsupported`).
    """
    qc = config.get("quantization_config")
    if not qc:
        return None
    why = unsupported(qc)
    if why is not None:
        raise ModelFormatError(f"config.json: quantization_config={qc!r} {why}")
    if qc.get("load_in_4bit"):
        kind = str(qc.get("bnb_4bit_quant_type") or "fp4").lower()
        return QuantFormat(kind, bool(qc.get("bnb_4bit_use_double_quant")))
    return QuantFormat("int8")


def check_packable(current: QuantFormat | None, fmt: QuantFormat, model_type: str, conv1d: bool,
                   experts: int) -> bool:
    """Whether a model can be stored as ``fmt``: True when it already is, False when it can be.

    Raises:
        ConfigError: already quantized otherwise; Conv1D weights (GPT-2); routed experts
            (transformers keeps them in fused 16-bit tensors, not ``nn.Linear``).
    """
    if current is not None:
        if current == fmt:
            return True
        raise ConfigError(f"the model is already quantized ({current.label}); it cannot be planned as "
                          f"{fmt.label}: drop --quantize")
    if conv1d:
        raise ConfigError(f"quantizing {model_type} (Conv1D weights) is not supported; quantize a Llama-family model")
    if experts:
        raise ConfigError(f"quantizing {model_type} (routed experts) is not supported: transformers keeps its experts "
                          "in fused 16-bit tensors; read a checkpoint quantized by transformers instead")
    return False


def quantizable(key: str, shape: Sequence[int]) -> bool:
    """True for a tensor transformers would quantize inside a decoder layer: a 2-D linear weight."""
    return key.endswith(".weight") and len(shape) == 2


def quant_state_json(fmt: QuantFormat, shape: Sequence[int], dtype: str, nested_offset: float | None = None) -> str:
    """The JSON bitsandbytes packs into ``<w>.quant_state.bitsandbytes__<type>`` (4-bit).

    ``nested_offset`` (double quant: the mean of the block scales) depends on the weights;
    None writes a typical 18-digit value, for sizing a weight not yet quantized.
    """
    state: dict[str, Any] = {"quant_type": fmt.method, "blocksize": BLOCKSIZE,
                             "dtype": _DTYPE_NAMES.get(dtype, dtype), "shape": [int(s) for s in shape]}
    if fmt.double_quant:
        state.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                      "nested_offset": 0.012345678901234567 if nested_offset is None else nested_offset})
    return json.dumps(state)


def stored_tensors(key: str, shape: Sequence[int], fmt: QuantFormat, *, dtype: str = "F32",
                   packed_itemsize: int = 1, blob_bytes: int | None = None
                   ) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """``(in-unit key, dtype code, shape)`` of every tensor a weight ``key`` is stored as.

    Args:
        key: the dense weight's key (``...q_proj.weight``).
        shape: its dense ``[out, in]`` shape.
        fmt: the quantization.
        dtype: the dense dtype code (sizes the quant-state JSON).
        packed_itemsize: bytes per element of the 4-bit data's storage dtype
            (``bnb_4bit_quant_storage``; uint8 by default).
        blob_bytes: the quant-state JSON's length when known (from a file).
    """
    out_features, in_features = int(shape[0]), int(shape[1])
    n = out_features * in_features
    if fmt.method == "int8":
        module = key.removesuffix(".weight")
        return ((key, "I8", (out_features, in_features)), (module + ".SCB", "F32", (out_features,)),
                (module + ".weight_format", "U8", ()))
    blocks = -(-n // BLOCKSIZE)
    packed_bytes = (n + 1) // 2
    rows = packed_bytes // packed_itemsize if packed_bytes % packed_itemsize == 0 else packed_bytes
    if blob_bytes is None:
        blob_bytes = len(quant_state_json(fmt, shape, dtype).encode("utf-8"))
    out = [(key, "U8", (rows, 1)), (key + ".absmax", "U8" if fmt.double_quant else "F32", (blocks,)),
           (key + ".quant_map", "F32", (16,))]
    if fmt.double_quant:
        out += [(key + ".nested_absmax", "F32", (-(-blocks // NESTED_BLOCKSIZE),)),
                (key + ".nested_quant_map", "F32", (256,))]
    out.append((key + "." + _BLOB + fmt.method, "U8", (blob_bytes,)))
    return tuple(out)


def packed_weight(key: str, shape: Sequence[int], fmt: QuantFormat) -> PackedWeight:
    """The :class:`PackedWeight` of a weight quantized with ``fmt`` (every stored key)."""
    stored = tuple(k for k, _, _ in stored_tensors(key, shape, fmt))
    return PackedWeight(key, (int(shape[0]), int(shape[1])), fmt, stored)


def _stored_format(name: str, header: Mapping[str, Any]) -> QuantFormat | None:
    """How the weight ``name`` is stored in ``header``: 4-bit, int8, or None (dense)."""
    for method in ("nf4", "fp4"):
        if f"{name}.{_BLOB}{method}" in header:
            return QuantFormat(method, f"{name}.nested_absmax" in header)
    if name.endswith(".weight") and name.removesuffix("weight") + "SCB" in header:
        return QuantFormat("int8")
    return None


def match_packed(expected: Sequence[ExpectedTensor], header: Mapping[str, Mapping[str, Any]],
                 decoder_units: range, conv1d: bool
                 ) -> tuple[list[ExpectedTensor], dict[int, list[PackedWeight]], list[str]]:
    """Replace every expected linear weight the header stores packed by its stored tensors.

    Args:
        expected: what the family's math needs (dense).
        header: the file's tensors (name -> ``{"dtype", "shape", ...}``).
        decoder_units: the unit indices of the decoder layers (the only ones quantized).
        conv1d: the family stores ``[in, out]`` Conv1D weights (GPT-2): refused when packed.

    Returns:
        ``(expected tensors, packed weights by unit, problems)``: the stored tensors take
        the weight's place (each with the shape and dtype the format implies), so a file
        is still checked tensor by tensor; problems name wrong dtypes.
    """
    out: list[ExpectedTensor] = []
    packed: dict[int, list[PackedWeight]] = {}
    problems: list[str] = []
    for e in expected:
        fmt = _stored_format(e.names[0], header) if e.unit in decoder_units and quantizable(e.key, e.shape) else None
        if fmt is None:
            out.append(e)
            continue
        if conv1d:
            raise ModelFormatError(f"{e.names[0]} is quantized: quantized Conv1D (GPT-2) checkpoints are "
                                   "not supported; use the 16-bit model")
        prefix = e.names[0][: -len(e.key)]
        data = header.get(e.names[0], {})
        packed_code = str(data.get("dtype", "U8"))
        blob = header.get(f"{e.names[0]}.{_BLOB}{fmt.method}", {})
        blob_shape = list(blob.get("shape", [0]))
        stored = stored_tensors(e.key, e.shape, fmt, packed_itemsize=_ITEMSIZE.get(packed_code, 1),
                                blob_bytes=int(blob_shape[0]) if len(blob_shape) == 1 else 0)
        keys = []
        for i, (key, code, shape) in enumerate(stored):
            name = prefix + key
            if key.endswith(".weight_format") and name not in header:
                continue  # older int8 checkpoints do not write it
            have = header.get(name, {}).get("dtype")
            if have is not None and have != code and not (i == 0 and fmt.bits == 4 and have in _ITEMSIZE):
                problems.append(f"{name} is {have}, a {fmt.label} weight stores it as {code}")
            out.append(ExpectedTensor(e.unit, key, (name,), shape))
            keys.append(key)
        packed.setdefault(e.unit, []).append(PackedWeight(e.key, (e.shape[0], e.shape[1]), fmt, tuple(keys)))
    return out, packed, problems



def bytes_per_parameter(fmt: QuantFormat, shape: Sequence[int] = (4096, 4096)) -> float:
    """Stored bytes per parameter of a weight of this shape, all its tensors counted."""
    total = sum(math.prod(s) * _ITEMSIZE.get(code, 1) for _, code, s in stored_tensors("w.weight", shape, fmt))
    return total / (int(shape[0]) * int(shape[1]))


def _align(n: int, to: int = 64) -> int:
    return -(-n // to) * to


def dense_layout(packed: Sequence[PackedWeight], itemsize: int) -> tuple[tuple[PackedWeight, int], ...]:
    """Where each dequantized weight of a unit sits in the scratch buffer: ``(weight, byte offset)``,
    each at a multiple of 64 bytes (as the slots lay tensors out)."""
    out, offset = [], 0
    for p in packed:
        out.append((p, offset))
        offset = _align(offset + p.numel * itemsize)
    return tuple(out)


def dense_bytes(packed: Sequence[PackedWeight], itemsize: int) -> int:
    """Bytes of the scratch buffer holding a unit's weights dequantized (:func:`dense_layout`)."""
    return sum(_align(p.numel * itemsize) for p in packed)
