"""ModelSpec: what a model is, tensor by tensor, without reading any weights.

Built from a safetensors header (names, dtypes, shapes, byte ranges) plus the model's
``config.json`` dict, or from the config alone (shapes implied, no file). Pure: the
header is read by :mod:`lema.adapters.weights.safetensors_header`.

Example:
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
    >>> spec = ModelSpec.from_config(cfg, dtype="BF16")
    >>> spec.n_layers, spec.units[1].name
    (2, 'layers.0')
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Mapping

import attrs

from lema.domain.families import registry as arch
from lema.domain.nn import quant
from lema.domain.nn.quant import PackedWeight, QuantFormat
from lema.errors import ConfigError, ModelFormatError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> bytes per element. Kept free of torch so that reading a
# header and planning (``lema plan``) never pays torch's multi-second import.
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
# The dtypes a model's weights may have (the layers compute in floating point).
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def __getattr__(name: str) -> Any:
    # ``DTYPES`` (code -> (torch dtype, bytes)) is built on first use so importing this
    # module does not import torch.
    if name == "DTYPES":
        import torch

        return {code: (getattr(torch, _TORCH_NAMES[code]), size) for code, size in DTYPE_BYTES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
_NAMES = {**{name: code for code, name in _TORCH_NAMES.items()},
          "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
          "fp32": "F32", "fp16": "F16", "bf16": "BF16", "half": "F16", "float": "F32"}


def dtype_code(value: "str | torch.dtype") -> str:
    """Normalise ``torch.bfloat16`` / ``"bfloat16"`` / ``"bf16"`` / ``"BF16"`` to ``"BF16"``."""
    text = str(value).removeprefix("torch.")
    if text.upper() in DTYPE_BYTES:
        return text.upper()
    if text.lower() in _NAMES:
        return _NAMES[text.lower()]
    raise ModelFormatError(f"unknown dtype {value!r}; use float32, float16 or bfloat16")


def torch_dtype(code: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype code."""
    import torch

    return getattr(torch, _TORCH_NAMES[dtype_code(code)])


def output_dtype(value: "str | torch.dtype | None") -> "torch.dtype | None":
    """A user's ``dtype=`` option (None: keep) as a torch dtype.

    Raises:
        ConfigError: for a value that is not a dtype.
    """
    if value is None:
        return None
    try:
        code = dtype_code(value)
    except ModelFormatError:
        code = ""
    if code not in FLOAT_CODES:
        raise ConfigError(f"dtype={value!r} is not a floating-point dtype; use float32, float16 or bfloat16")
    return torch_dtype(code)


def _first(items: list[str], n: int, sep: str = ", ") -> str:
    """The first ``n`` items joined, and how many more there are."""
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return DTYPE_BYTES[dtype_code(code)]


@attrs.frozen
class TensorSpec:
    """One stored tensor.

    Attributes:
        name: its name in the file.
        key: its name inside its unit (what the blocks read).
        dtype: safetensors dtype code (``"F16"``).
        shape: the tensor's shape.
        file: the file holding it, relative to the model folder ("" when there is no file).
        start: absolute byte offset of its data in ``file`` (-1 when there is no file).
    """

    name: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str = ""
    start: int = -1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def end(self) -> int:
        return self.start + self.nbytes


@attrs.frozen
class LayerUnit:
    """A group of tensors fetched together: the embedding, one decoder layer, or the head.

    ``tensors`` are what is stored (and streamed); a quantized linear weight is stored as
    several tensors, listed in ``packed`` (:mod:`lema.domain.nn.quant`), and becomes one
    dense tensor under its own key only once dequantized on the device.
    """

    index: int
    kind: str  # arch.EMBED, arch.DECODER or arch.HEAD
    name: str  # "embed", "layers.3", "head"
    tensors: tuple[TensorSpec, ...]
    packed: tuple[PackedWeight, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, key: str) -> TensorSpec:
        for t in self.tensors:
            if t.key == key:
                return t
        raise KeyError(key)

    @property
    def stored_keys(self) -> frozenset[str]:
        """Keys of the tensors that hold packed weights (data and quantization state)."""
        return frozenset(k for p in self.packed for k in p.stored)

    def dense_shape(self, key: str) -> tuple[int, ...]:
        """The shape the blocks see for ``key``: a packed weight's dense shape, else the tensor's."""
        for p in self.packed:
            if p.key == key:
                return p.shape
        return self.tensor(key).shape


@attrs.frozen(eq=False)
class ModelSpec:
    """A model's architecture and storage layout.

    Units: ``units[0]`` is the embedding, ``units[1..n_layers]`` the decoder layers and
    ``units[n_layers + 1]`` the head. Tied weights appear in both the embedding and the
    head unit but are counted once in :attr:`parameters` and :attr:`weight_bytes`.
    """

    family: str
    model_type: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    attention_bias: bool
    max_positions: int
    dtype: str
    units: tuple[LayerUnit, ...]
    config_json: str  # the Hugging Face config, as JSON text (kept hashable and immutable)
    activation: str = "silu"
    n_experts: int = 0  # mixture of experts: experts per routed layer, experts per token, expert MLP width
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    quantization: QuantFormat | None = None  # how the decoder layers' linear weights are stored

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def embed_unit(self) -> LayerUnit:
        return self.units[0]

    @property
    def head_unit(self) -> LayerUnit:
        return self.units[-1]

    @property
    def decoder_units(self) -> tuple[LayerUnit, ...]:
        return self.units[1:-1]

    def _unique(self) -> dict[str, TensorSpec]:
        return {t.name: t for u in self.units for t in u.tensors}

    @property
    def parameters(self) -> int:
        """Parameters of the model (a packed weight counts its dense elements)."""
        stored = {t.name for u in self.units for t in u.tensors if t.key in u.stored_keys}
        dense = sum(t.numel for t in self._unique().values() if t.name not in stored)
        return dense + sum(p.numel for u in self.units for p in u.packed)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self._unique().values())

    @property
    def largest_layer_bytes(self) -> int:
        """Bytes of the largest decoder layer."""
        return max(u.nbytes for u in self.decoder_units)

    @property
    def largest_unit_bytes(self) -> int:
        """Bytes of the largest unit streamed to the device (decoder layers and head)."""
        return max(u.nbytes for u in self.units[1:])

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted({t.file for u in self.units for t in u.tensors if t.file}))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: str | None = None) -> "ModelSpec":
        """Shapes implied by a config alone (no weights file), e.g. to plan before downloading.

        Args:
            config: the Hugging Face ``config.json`` dict.
            dtype: storage dtype; defaults to the config's ``torch_dtype``/``dtype`` or F16.
        """
        dims = arch.dims_of(config)
        if dtype is not None:
            code = dtype_code(dtype)
        else:
            field = next((k for k in ("dtype", "torch_dtype") if config.get(k)), None)
            value = config[field] if field else "float16"
            try:
                code = dtype_code(value) if isinstance(value, str) else ""
            except ModelFormatError:
                code = ""
            if code not in FLOAT_CODES:
                raise ModelFormatError(f"config.json: {field}={value!r} is not a floating-point dtype; "
                                       "use float32, float16 or bfloat16")
        tensors = [
            (e.unit, TensorSpec(name=e.names[-1] if e.key == "lm_head.weight" and dims.tied_embeddings else e.names[0],
                                key=e.key, dtype=code, shape=e.shape))
            for e in arch.expected_tensors(config)
        ]
        fmt = quant.format_of(config)
        if fmt is not None and arch.family(dims.family).conv1d:
            raise ModelFormatError(f"config.json: a quantized {dims.model_type} (Conv1D weights) is not supported; "
                                   "use the 16-bit model")
        spec = cls._build(dims, code, tensors, config)
        return spec if fmt is None else spec.quantized(fmt)

    def quantized(self, fmt: QuantFormat) -> "ModelSpec":
        """This model with its decoder layers' 2-D (linear) weights stored as ``fmt``, shapes
        only: what ``lema plan --quantize`` plans and ``lema convert --quantize`` writes.

        Raises:
            ConfigError: see :func:`lema.domain.nn.quant.check_packable`.
        """
        if quant.check_packable(self.quantization, fmt, self.model_type, arch.family(self.family).conv1d,
                                self.n_experts):
            return self
        units = []
        for u in self.units:
            packed = [quant.packed_weight(t.key, t.shape, fmt) for t in u.tensors
                      if u.kind == arch.DECODER and quant.quantizable(t.key, t.shape)]
            keys, dt = {p.key for p in packed}, self.dtype
            tensors = [t for t in u.tensors if t.key not in keys] + [
                TensorSpec(name=t.name[: -len(t.key)] + k, key=k, dtype=c, shape=s)
                for t in u.tensors if t.key in keys for k, c, s in quant.stored_tensors(t.key, t.shape, fmt, dtype=dt)]
            units.append(attrs.evolve(u, tensors=tuple(tensors), packed=tuple(packed)))
        config = self.config
        if quant.format_of(config) != fmt:
            config["quantization_config"] = fmt.to_config(self.dtype)
        return attrs.evolve(self, units=tuple(units), quantization=fmt, config_json=json.dumps(config, sort_keys=True))

    @classmethod
    def from_header(cls, header: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> "ModelSpec":
        """Match a safetensors header against the tensors the config implies.

        Args:
            header: tensor name -> ``{"dtype": "F16", "shape": [..], "file": "model.safetensors",
                "start": absolute_offset}`` for every tensor of the model (all shards merged;
                ``__metadata__`` removed).
            config: the Hugging Face ``config.json`` dict.

        Raises:
            ModelFormatError: one line listing every missing tensor, every shape that
                disagrees with the config and every tensor the family's math does not use
                (other than known buffers such as ``rotary_emb.inv_freq``); or when the file
                has no recognisable layers; or naming a config option LEMA does not implement.
        """
        dims = arch.dims_of(config)
        expected = arch.expected_tensors(config, set(header))
        fmt = quant.format_of(config)
        # Quantized linear weights: their stored tensors take their place (checked by name too;
        # their dtypes are checked there).
        expected, packed, problems = quant.match_packed(expected, header, range(1, dims.n_layers + 1),
                                                        arch.family(dims.family).conv1d)
        stored = {(u, k) for u, ps in packed.items() for p in ps for k in p.stored}
        missing: list[str] = []
        shapes: list[str] = []
        tensors: list[tuple[int, TensorSpec]] = []
        used: set[str] = set()
        decoder_found = False
        for e in expected:
            name = next((n for n in e.names if n in header), None)
            if name is None:
                missing.append(e.names[0])
                continue
            used.add(name)
            decoder_found = decoder_found or e.unit not in (0, dims.n_layers + 1)
            entry = header[name]
            shape = tuple(int(s) for s in entry["shape"])
            if shape != e.shape:
                shapes.append(f"{name} has shape {list(shape)}, config implies {list(e.shape)}")
                continue
            code = dtype_code(entry["dtype"])
            if code not in FLOAT_CODES and (e.unit, e.key) not in stored:
                problems.append(f"{name} has dtype {code}, not a floating-point type (F32, F16, BF16)")
                continue
            tensors.append((e.unit, TensorSpec(name=name, key=e.key, dtype=code, shape=shape,
                                               file=str(entry.get("file", "")), start=int(entry.get("start", -1)))))
        if not decoder_found:
            raise ModelFormatError(
                f"no recognisable {dims.family} decoder layers in the weights (expected names like "
                f"{expected[1].names[0]}); is the config for this file?"
            )
        unknown = sorted(n for n in header if n not in used and not arch.is_ignored(n))
        if unknown:
            hint = (" (experts fused as transformers holds them in memory: save the model with save_pretrained, "
                    "which writes one tensor per expert)" if any(n.endswith("experts.gate_up_proj") for n in unknown)
                    else " (a config option LEMA does not know, or a file for another model)")
            what = "1 tensor" if len(unknown) == 1 else f"{len(unknown)} tensors"
            problems.append(f"{what} the {dims.model_type} math does not use: {_first(unknown, 6)}{hint}")
        if missing:
            problems.append(f"missing {_first(missing, 4)}")
        if shapes:
            problems.append(_first(shapes, 4, "; "))
        if problems:
            raise ModelFormatError(f"weights do not match config.json ({dims.model_type}, "
                                   f"{dims.n_layers} layers): " + "; ".join(problems))
        layer_dtypes = [t.dtype for u, t in tensors if u not in (0, dims.n_layers + 1) and (u, t.key) not in stored]
        # The most common decoder dtype (of the dense tensors: a quantized model computes in the
        # dtype its norms are stored in); ties broken by name so the result never depends on
        # set iteration order (string hashing is randomised per process).
        code = max(sorted(set(layer_dtypes)), key=layer_dtypes.count) if layer_dtypes else dtype_code(
            config.get("dtype") or config.get("torch_dtype") or "float16")
        if packed and fmt is None:  # no quantization_config: the first packed weight's format
            fmt = next(iter(packed.values()))[0].format
        return cls._build(dims, code, tensors, config, packed, fmt if packed else None)

    @classmethod
    def _build(cls, dims: arch.Dims, code: str, tensors: list[tuple[int, TensorSpec]],
               config: Mapping[str, Any], packed: Mapping[int, list[PackedWeight]] | None = None,
               quantization: QuantFormat | None = None) -> "ModelSpec":
        grouped: dict[int, list[TensorSpec]] = {i: [] for i in range(dims.n_layers + 2)}
        for unit, t in tensors:
            grouped[unit].append(t)
        units = []
        for i, ts in grouped.items():
            kind = arch.EMBED if i == 0 else arch.HEAD if i == dims.n_layers + 1 else arch.DECODER
            name = "embed" if i == 0 else "head" if kind == arch.HEAD else f"layers.{i - 1}"
            units.append(LayerUnit(index=i, kind=kind, name=name, tensors=tuple(ts),
                                   packed=tuple((packed or {}).get(i, ()))))
        return cls(
            family=dims.family, model_type=dims.model_type, n_layers=dims.n_layers,
            hidden_size=dims.hidden_size, n_heads=dims.n_heads, n_kv_heads=dims.n_kv_heads,
            head_dim=dims.head_dim, intermediate_size=dims.intermediate_size,
            vocab_size=dims.vocab_size, tied_embeddings=dims.tied_embeddings,
            attention_bias=dims.attention_bias, max_positions=dims.max_positions, dtype=code,
            units=tuple(units), config_json=json.dumps(dict(config), sort_keys=True), activation=dims.activation,
            n_experts=dims.n_experts, experts_per_token=dims.experts_per_token,
            expert_intermediate_size=dims.expert_intermediate_size, quantization=quantization,
        )
