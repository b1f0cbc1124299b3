"""LemaModel's PyTorch face: an ``nn.Module`` whose parameters are the LoRA adapters.

:class:`AdapterModule` is the base of :class:`~lema.app.training.model.LemaModel`. Its
parameters are the adapter tensors themselves (the ones ``get_trainable_parameters()``
returns and the engine trains), registered under peft's names, so ``parameters()``,
``named_parameters()``, ``state_dict()`` and ``load_state_dict()`` speak peft's keys
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). The frozen base
weights are no part of the module: they stay in the weights file and stream through the
device.

``forward(input_ids, attention_mask=None, position_ids=None, labels=None)`` returns a
transformers ``CausalLMOutputWithPast``: ``loss`` (with ``labels``; shifted inside, as in
transformers) and ``logits`` (without labels, or with ``return_logits=True``). With
gradients enabled its ``loss.backward()`` runs the streamed backward
(:mod:`lema.app.training.streamed_loss`), so a plain PyTorch loop, ``transformers.Trainer``
and ``accelerate`` train the adapters. The device is LEMA's (``LemaConfig.device``):
``to()`` to that device is a no-op and to any other one an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lema.errors import ConfigError


class AdapterModule(torch.nn.Module):
    """The ``nn.Module`` surface of a streamed model (the methods LemaModel adds to it)."""

    main_input_name = "input_ids"  # what transformers.Trainer looks for
    _keys_to_ignore_on_save = None
    supports_gradient_checkpointing = True

    @property
    def config(self) -> Any:
        """The LemaConfig the model was built with, read-only (a :class:`ModelConfig` view,
        on which transformers' Trainer may set ``use_cache``)."""
        return self.__dict__["_config_view"]

    @config.setter
    def config(self, value: Any) -> None:
        self.__dict__["_config_view"] = value if isinstance(value, ModelConfig) else ModelConfig(value)

    @property
    def lema_config(self) -> Any:
        """The :class:`~lema.config.LemaConfig` itself."""
        return self.config.lema_config

    # -- the adapters as parameters ---------------------------------------------------------

    def register_adapters(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Register ``(peft name, parameter)`` pairs as this module's parameters (replacing the
        previous adapters), in a tree of empty modules that spells out peft's key names."""
        for top in [name for name, child in self._modules.items() if isinstance(child, _Names)]:
            del self._modules[top]
        for name, param in named:
            *path, leaf = name.split(".")
            node: torch.nn.Module = self
            for part in path:
                child = node._modules.get(part)
                if child is None:
                    child = _Names()
                    node.add_module(part, child)
                node = child
            node.register_parameter(leaf, param)

    def __repr__(self) -> str:
        # nn.Module's repr would print every node of the adapter tree (thousands of lines).
        spec, lora = getattr(self, "spec", None), getattr(self, "lora_spec", None)
        if spec is None or lora is None:  # construction failed half-way
            return f"{type(self).__name__}(not built)"
        n = sum(p.numel() for p in self.parameters())
        return (f"{type(self).__name__}({spec.model_type}, {spec.n_layers} layers, LoRA rank {lora.rank}, "
                f"{n:,} trainable parameters, on {self.device.torch_device})")  # type: ignore[attr-defined]

    # -- forward -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                return_logits: bool | None = None) -> Any:
        """Loss and/or logits of base + adapters, as transformers' causal LMs return them.

        Args:
            input_ids: ``(batch, seq)`` token ids (a 1-D tensor is one sequence).
            attention_mask: ``(batch, seq)`` 1 for tokens, 0 for padding.
            position_ids: positions; restarting at 0 inside a row marks packed examples.
            labels: ``(batch, seq)`` targets, -100 ignored, shifted inside (as transformers
                does); ``loss`` is their mean token cross-entropy.
            return_logits: also return the float32 ``(batch, seq, vocab)`` logits (default:
                only when there are no labels, so that training never holds them).

        Returns:
            ``transformers.modeling_outputs.CausalLMOutputWithPast`` with ``loss`` (a 0-d
            float32 tensor, None without labels) and ``logits`` (None unless asked for).
            The logits carry no gradient: train through ``loss``. With gradients enabled
            (and adapters that require them), the forward runs the whole streamed training
            pass and ``loss.backward()`` adds the adapters' gradients to their ``.grad``;
            under ``torch.no_grad()`` it is a forward pass only.
        """
        from transformers.modeling_outputs import CausalLMOutputWithPast

        want_logits = labels is None if return_logits is None else bool(return_logits)
        if labels is None:
            if not want_logits:
                raise ConfigError("forward: nothing to compute; pass labels (for the loss) or return_logits=True")
            return CausalLMOutputWithPast(logits=self.logits(input_ids, attention_mask,  # type: ignore[attr-defined]
                                                             position_ids, training=self.training))
        params = self.get_trainable_parameters() if self.lora is not None else []  # type: ignore[attr-defined]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            from lema.app.training.streamed_loss import StreamedLoss, streamed_pass

            def run() -> Any:
                return streamed_pass(self, input_ids, labels, attention_mask,  # type: ignore[arg-type]
                                     position_ids, training=self.training, keep_logits=want_logits)

            loss = StreamedLoss.apply(run, *params)
            return CausalLMOutputWithPast(loss=loss, logits=getattr(run, "logits", None))
        loss_sum, n, logits = self.scores(input_ids, labels, attention_mask, position_ids,  # type: ignore[attr-defined]
                                          keep_logits=want_logits, training=self.training)
        loss = torch.tensor(loss_sum / max(n, 1), dtype=torch.float32, device=self.device.torch_device)  # type: ignore[attr-defined]
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # -- transformers' and PyTorch's expectations ----------------------------------------------

    def to(self, *args: Any, **kwargs: Any) -> "AdapterModule":
        """A no-op for this model's own device (and float32); anything else is refused: the
        device is chosen when the model is built (``LemaConfig(device=...)``), where the
        base weights stream to and the memory plan holds."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        own = self.device.torch_device  # type: ignore[attr-defined]
        if dtype is not None and dtype != torch.float32:
            raise ConfigError(f"LemaModel.to({dtype}): the adapters train in float32 and the base weights' dtype is "
                              "LemaConfig(dtype=...); build the model with the dtype you want")
        if device is not None and not _same_device(torch.device(device), own):
            raise ConfigError(f"LemaModel.to({device}): this model runs on {own}, chosen when it was built "
                              f"(the base weights stream there and the memory plan is for it); build it with "
                              f"LemaConfig(device='{device}') instead of moving it")
        return self

    def cuda(self, device: Any = None) -> "AdapterModule":
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device)
                       if isinstance(device, int) else device)

    def cpu(self) -> "AdapterModule":
        return self.to("cpu")

    def _apply(self, fn: Any, recurse: bool = True) -> "AdapterModule":
        raise ConfigError("LemaModel: moving or casting the model (.half(), .float(), .type(), ...) is not "
                          "supported; the device and dtype are chosen by LemaConfig when the model is built")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Any = None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """transformers' hook (Trainer's ``activation_checkpointing=True``): LEMA checkpoints
        every layer already (whatever ``every_n_layers``: never fewer recomputes than the
        plan's), and moves the checkpoints to host memory when its plan says so.

        Raises:
            ConfigError: the model was built without checkpointing, or ``offload`` is asked
                of a plan that keeps the activations on the device (build with the setting).
        """
        config = self.config
        if not config.gradient_checkpointing:
            raise ConfigError("this model was built with gradient_checkpointing=False and its memory plan keeps "
                              "every layer's graph; build it with LemaConfig(gradient_checkpointing=True)")
        if offload and not self.plan().offload_activations:  # type: ignore[attr-defined]
            raise ConfigError("activation offload is part of the memory plan, made when the model is built: "
                              "build it with LemaConfig(offload_activations=True)")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Any = None, every_n_layers: int = 1,
                                      offload: bool = False) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        if self.config.gradient_checkpointing:
            raise ConfigError("this model's memory plan recomputes every layer (gradient_checkpointing=True); "
                              "build it with LemaConfig(gradient_checkpointing=False) to keep the graphs")

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.config.gradient_checkpointing)  # type: ignore[attr-defined]

    # -- outputs -------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the adapters as a peft adapter folder (``adapter_config.json`` and
        ``adapter_model.safetensors``: ``peft.PeftModel.from_pretrained`` reads it).

        Raises:
            OutputError: the folder holds something already (unless ``overwrite``), or it is,
                contains or lies inside an input of this model.
        """
        from lema.adapters.checkpoints.store import write_checkpoint
        from lema.app.outputs import check_output

        lora = self.require_lora()  # type: ignore[attr-defined]
        check_output(save_directory, option="save_pretrained", files=self.input_paths(),  # type: ignore[attr-defined]
                     overwrite=overwrite, replaces_folder=True, flag="overwrite=True")
        return write_checkpoint(save_directory, adapter_tensors=lora.state_dict_peft(self.spec),  # type: ignore[attr-defined]
                                adapter_config=self.adapter_config())  # type: ignore[attr-defined]

    def generate(self, input_ids: Any, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        """Continue ``input_ids`` (greedy or sampled, with a KV cache, the weights streaming):
        :func:`lema.app.tools.generation.generate`, whose options it takes."""
        from lema.app.tools.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)  # type: ignore[arg-type]


class ModelConfig:
    """``model.config``: the model's LemaConfig, read through (``model.config.lora_rank``),
    plus ``use_cache``, which transformers' Trainer sets on every model: LEMA notes it and
    needs it nowhere (a training pass never caches keys and values; ``generate`` always does).
    ``lema_config`` is the LemaConfig itself."""

    _SETTABLE = ("use_cache",)

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "lema_config", config)
        object.__setattr__(self, "use_cache", False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.lema_config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._SETTABLE:
            raise AttributeError(f"model.config.{name} is read-only: the memory plan was made for the config the "
                                 "model was built with; build a new LemaModel with the setting changed")
        object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return self.lema_config == (other.lema_config if isinstance(other, ModelConfig) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.lema_config)


class _Names(torch.nn.Module):
    """A node of the adapter tree: holds children and parameters, computes nothing."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("the adapter tree only names the adapters; call the LemaModel")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same kind, and the same index where both name one (``cuda`` is the current ``cuda:N``)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
