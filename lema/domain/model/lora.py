"""LoRA state: which modules are adapted, their shapes, initialisation, scaling and PEFT names.

A LoRA adapter on a frozen linear map ``y = W x`` adds ``(B (A dropout(x))) * scaling`` with
``A: (rank, in)`` and ``B: (out, rank)``. LEMA keeps ``A`` and ``B`` as fp32 master tensors,
one independent pair per targeted module per decoder layer, and names them the way PEFT
does so ``peft.PeftModel.from_pretrained`` reads LEMA's checkpoints.

Targets follow PEFT's ``target_modules`` list semantics: a name targets every module whose
in-layer key equals it or ends with ``"." + name`` (``"c_proj"`` hits both GPT-2's
``attn.c_proj`` and ``mlp.c_proj``; ``"mlp.c_proj"`` only the latter).

Example:
    >>> from lema.domain.model.spec import ModelSpec
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    ...        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
    >>> spec = ModelSpec.from_config(cfg, dtype="F32")
    >>> lora = init_lora(spec, LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj")), seed=0)
    >>> lora.layer(1)["self_attn.q_proj"][0].shape
    torch.Size([4, 64])
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TypeAlias

import attrs

from lema.domain.families import registry as arch
from lema.domain.model.spec import ModelSpec
from lema.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch is imported lazily so that planning (`lema plan`) never pays for it
    import torch



def _module_keys(family: str) -> tuple[str, ...]:
    """Every adaptable linear module of the family's decoder layer, in execution order."""
    return arch.family(family).module_keys


def _peft_prefix(family: str) -> str:
    """PEFT's prefix of decoder layer i inside a CausalLM wrapped by PeftModel."""
    return arch.family(family).peft_prefix


_PEFT_KEY = re.compile(r"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


# Far above any useful adapter (ranks are 4..256); keeps a typo from allocating terabytes.
MAX_RANK = 65_536


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"LoRA {attribute.name}={value!r} must be a positive integer (e.g. 8 or 16)")
    if value > MAX_RANK:
        raise ConfigError(f"LoRA {attribute.name}={value} is more than {MAX_RANK:,}; use e.g. 8, 16 or 64")


def _number(value: Any) -> Any:
    # Numbers become floats; anything else is left for the validator to name.
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _positive_float(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"LoRA {attribute.name}={value!r} must be a positive number (e.g. 2 * rank)")


def _probability(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, float) or not 0.0 <= value < 1.0:
        raise ConfigError(f"LoRA {attribute.name}={value!r} must be a number in [0, 1)")


def _boolean(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"LoRA {attribute.name}={value!r} must be true or false")


def _to_targets(value: Any) -> Any:
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _targets(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...] | None) -> None:
    if value is not None and (not isinstance(value, tuple) or not value
                              or not all(isinstance(t, str) and t for t in value)):
        raise ConfigError(f"LoRA {attribute.name}={value!r} must be a non-empty list of module names")


@attrs.frozen
class LoraSpec:
    """The hyper-parameters of a LoRA adapter (PEFT's ``LoraConfig`` subset LEMA supports).

    Attributes:
        rank: ``r``, the inner dimension of ``A`` and ``B``.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``.
        dropout: ``lora_dropout``, applied to the adapter's input in training.
        targets: module names, PEFT ``target_modules`` semantics (see the module docstring);
            None for the family's defaults (:func:`lema.domain.families.registry.default_targets`).
        use_rslora: scale by ``alpha / sqrt(rank)`` instead (rank-stabilised LoRA).

    Raises:
        ConfigError: naming the field and the value when one is out of range.
    """

    rank: int = attrs.field(default=16, validator=_positive_int)
    alpha: float = attrs.field(default=32.0, converter=_number, validator=_positive_float)
    dropout: float = attrs.field(default=0.0, converter=_number, validator=_probability)
    targets: tuple[str, ...] | None = attrs.field(default=None, converter=_to_targets, validator=_targets)
    use_rslora: bool = attrs.field(default=False, validator=_boolean)

    @property
    def scaling(self) -> float:
        """The factor the adapter's output is multiplied by."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @classmethod
    def from_adapter_config(cls, config: Mapping[str, Any]) -> "LoraSpec":
        """Read a PEFT ``adapter_config.json`` dict.

        Raises:
            CheckpointError: when the config is not a plain LoRA adapter LEMA can train.
        """
        problems = []
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            problems.append(f"peft_type={config.get('peft_type')!r} (LEMA reads LORA adapters)")
        for name in ("use_dora", "lora_bias"):
            if config.get(name):
                problems.append(f"{name}={config[name]!r} is not supported")
        for name in ("rank_pattern", "alpha_pattern"):
            if config.get(name):
                problems.append(f"{name} is not supported")
        for name in ("layers_to_transform", "modules_to_save"):
            if config.get(name):
                problems.append(f"{name}={config[name]!r} is not supported")
        targets = config.get("target_modules")
        if isinstance(targets, str):
            problems.append(f"target_modules={targets!r}: regex targets are not supported, give a list")
        elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            problems.append(f"target_modules={targets!r} must be a list of module names")
        if problems:
            raise CheckpointError("adapter_config.json: " + "; ".join(problems))
        try:
            return cls(rank=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                       dropout=config.get("lora_dropout") or 0.0,
                       targets=tuple(sorted(targets)) if targets is not None else None,
                       use_rslora=config.get("use_rslora") or False)
        except ConfigError as exc:
            raise CheckpointError(f"adapter_config.json: {exc}") from exc


def _matches(key: str, target: str) -> bool:
    return key == target or key.endswith("." + target)


def resolve_targets(family: str, requested: Sequence[str] | None) -> tuple[str, ...]:
    """Validate LoRA target module names for a family.

    Args:
        family: a family name (``spec.family``).
        requested: module names (``"q_proj"``, ``"self_attn.q_proj"``, ``"attn.c_attn"``),
            ``["all-linear"]`` for every adaptable module, or None for the family's default.

    Returns:
        The names, de-duplicated, in the order given (the defaults when ``requested`` is None).

    Raises:
        ConfigError: listing the names that match no module and the names that exist;
            ``all-linear`` on a mixture of experts (peft would adapt the experts and the
            router too, which LEMA does not train).
    """
    if requested is None:
        return arch.default_targets(family)
    if isinstance(requested, str):
        requested = [requested]
    names = tuple(dict.fromkeys(str(r).strip() for r in requested))
    module = arch.family(family)
    if names == ("all-linear",):
        if module.experts:
            raise ConfigError(f"LoRA target 'all-linear' on a {family} mixture of experts would, in peft, adapt the "
                              "experts and the router too (target_parameters), which LEMA does not train; name the "
                              f"modules instead: {', '.join(arch.target_modules(family))}")
        return arch.target_modules(family)
    keys = module.module_keys
    unknown = [n for n in names if not any(_matches(k, n) for k in keys)]
    if unknown or not names:
        experts = (" (LoRA on the experts and the router is not implemented)"
                   if module.experts else "")
        raise ConfigError(
            f"LoRA targets {unknown or list(names)} match no module of a {family} layer{experts}; "
            f"choose from {', '.join(arch.target_modules(family))} (or {', '.join(keys)})"
        )
    return names


def module_keys(spec: ModelSpec, targets: Sequence[str]) -> tuple[str, ...]:
    """The in-layer keys of the modules a target list adapts, in execution order.

    Example: ``module_keys(gpt2_spec, ["c_proj"]) == ("attn.c_proj", "mlp.c_proj")``.
    """
    return tuple(k for k in _module_keys(spec.family) if any(_matches(k, t) for t in targets))


def module_shape(spec: ModelSpec, key: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of a module key (GPT-2 Conv1D stores ``[in, out]``)."""
    shape = spec.decoder_units[0].dense_shape(key + ".weight")
    return (shape[0], shape[1]) if arch.family(spec.family).conv1d else (shape[1], shape[0])


LayerLora: TypeAlias = "dict[str, tuple[torch.Tensor, torch.Tensor]]"


@attrs.define(eq=False)
class LoraState:
    """The LoRA parameters of every decoder layer: ``layers[i][module_key] == (A, B)``.

    ``A`` has shape ``(rank, in)`` and ``B`` ``(out, rank)``; both are fp32 leaf tensors with
    ``requires_grad=True`` that the optimizer updates in place.
    """

    lora_spec: LoraSpec
    layers: tuple[LayerLora, ...]

    def layer(self, index: int) -> LayerLora:
        """The adapters of decoder layer ``index`` (0-based)."""
        return self.layers[index]

    def parameters(self) -> list[torch.Tensor]:
        """Every tensor, ordered by layer, then module, then A before B."""
        return [t for layer in self.layers for pair in layer.values() for t in pair]

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """``("layers.{i}.{module}.lora_A", A)`` pairs, in :meth:`parameters` order."""
        return [(f"layers.{i}.{key}.lora_{ab}", t)
                for i, layer in enumerate(self.layers) for key, pair in layer.items() for ab, t in zip("AB", pair)]

    def to(self, device: torch.device | str) -> "LoraState":
        """A copy on ``device`` (new leaf tensors that require grad)."""
        return LoraState(self.lora_spec, tuple(
            {k: tuple(t.detach().to(device).requires_grad_(True) for t in pair) for k, pair in layer.items()}
            for layer in self.layers))

    def state_dict_peft(self, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """The tensors under PEFT's saved names (``...layers.0.self_attn.q_proj.lora_A.weight``)."""
        prefix = _peft_prefix(spec.family)
        return {f"{prefix}{i}.{key}.lora_{ab}.weight": t.detach()
                for i, layer in enumerate(self.layers) for key, pair in layer.items() for ab, t in zip("AB", pair)}


def init_lora(spec: ModelSpec, lora_spec: LoraSpec, seed: int | torch.Generator = 0,
              device: torch.device | str = "cpu") -> LoraState:
    """Fresh adapters initialised like PEFT (``init_lora_weights=True``).

    ``A`` is ``kaiming_uniform_(a=sqrt(5))`` (uniform in ``±1/sqrt(in)``), ``B`` is zero, so the
    adapted model starts equal to the base model. Values are drawn on the CPU so a seed gives
    the same adapters on every device.

    Args:
        spec: the model.
        lora_spec: rank and targets.
        seed: an int seed or a CPU ``torch.Generator``.
        device: where the tensors live.

    Raises:
        ConfigError: when the targets match no module of this family.
    """
    targets = resolve_targets(spec.family, lora_spec.targets)
    keys = module_keys(spec, targets)
    import torch

    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    layers = []
    for _ in range(spec.n_layers):
        layer: LayerLora = {}
        for key in keys:
            fan_in, fan_out = module_shape(spec, key)
            a = torch.empty(lora_spec.rank, fan_in, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            b = torch.zeros(fan_out, lora_spec.rank, dtype=torch.float32)
            layer[key] = (a.to(device).requires_grad_(True), b.to(device).requires_grad_(True))
        layers.append(layer)
    return LoraState(lora_spec, tuple(layers))


def from_peft_state_dict(spec: ModelSpec, lora_spec: LoraSpec, tensors: Mapping[str, torch.Tensor],
                         device: torch.device | str = "cpu") -> LoraState:
    """Build adapters from PEFT-named tensors (saved names, or ``lora_A.default.weight``).

    Raises:
        CheckpointError: listing every missing module, wrong shape and unexpected key at once.
    """
    keys = module_keys(spec, resolve_targets(spec.family, lora_spec.targets))
    prefix = _peft_prefix(spec.family)
    import torch

    found: dict[tuple[int, str, str], torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in tensors.items():
        m = _PEFT_KEY.match(name)
        if m is None or m["prefix"] != prefix or m["module"] not in keys or int(m["layer"]) >= spec.n_layers:
            unexpected.append(name)
            continue
        found[(int(m["layer"]), m["module"], m["ab"])] = tensor
    problems: list[str] = []
    missing = [f"{prefix}{i}.{k}.lora_{ab}.weight" for i in range(spec.n_layers) for k in keys for ab in "AB"
               if (i, k, ab) not in found]
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
    layers = []
    for i in range(spec.n_layers):
        layer: LayerLora = {}
        for key in keys:
            fan_in, fan_out = module_shape(spec, key)
            pair = []
            for ab, shape in (("A", (lora_spec.rank, fan_in)), ("B", (fan_out, lora_spec.rank))):
                t = found.get((i, key, ab))
                if t is not None and tuple(t.shape) != shape:
                    problems.append(f"{prefix}{i}.{key}.lora_{ab}.weight has shape {list(t.shape)}, "
                                    f"expected {list(shape)} (rank {lora_spec.rank})")
                elif t is not None:
                    pair.append(t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True))
            if len(pair) == 2:
                layer[key] = (pair[0], pair[1])
        layers.append(layer)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(sorted(unexpected)[:4])})")
    if problems:
        raise CheckpointError(f"LoRA adapter does not match this {spec.model_type} model with targets "
                              f"{list(lora_spec.targets or ['(default)'])}: " + "; ".join(problems))
    return LoraState(lora_spec, tuple(layers))


def adapter_config(spec: ModelSpec, lora_spec: LoraSpec, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict PEFT 0.21 writes for this adapter.

    ``peft.LoraConfig(**adapter_config(...))`` (minus ``peft_type``) builds the same config.
    """
    alpha = lora_spec.alpha
    return {
        "task_type": "CAUSAL_LM",
        "peft_type": "LORA",
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": lora_spec.rank,
        "target_modules": sorted(resolve_targets(spec.family, lora_spec.targets)),
        "exclude_modules": None,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": lora_spec.dropout,
        "fan_in_fan_out": bool(arch.family(spec.family).conv1d),
        "bias": "none",
        "use_rslora": lora_spec.use_rslora,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "trainable_token_indices": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "use_dora": False,
        "layer_replication": None,
        "lora_bias": False,
        "target_parameters": None,
    }
