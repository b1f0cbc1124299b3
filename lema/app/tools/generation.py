"""Text generation with a KV cache, streaming the base weights through the device per token.

The prompt goes through the engine once (a prefill) and fills every layer's KV cache on the
device; each new token is then one more engine pass with only that token's activations,
attending over the cache (:mod:`lema.domain.model.decode`). The head computes the last
position's logits only. Weights stream exactly as in training's forward pass, so a model
bigger than the device generates too, one weight pass per token.

The cache is made by the compute inside the engine's passes, so the device counts it
itself (the CPU device's measuring, the CUDA allocator) for as long as it lives; it is
not ``track``-ed a second time. :func:`kv_cache_bytes` gives its size, and ``generate``
checks it against the device's capacity before the prefill.

Token choice follows transformers' ``generate``: greedy (``argmax``), or sampling after
temperature, then top-k, then top-p filtering; a row that produced an end-of-sequence
token emits padding from then on, and generation stops when every row has finished.

Example:
    >>> model = LemaModel(LemaConfig(gbi_path="tiny.safetensors", device="cpu"))  # doctest: +SKIP
    >>> out = generate(model, torch.tensor([[1, 5, 9]]), max_new_tokens=4)        # doctest: +SKIP
    >>> out.shape                                                                 # doctest: +SKIP
    torch.Size([1, 7])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from lema.app.runtime.batches import as_batch
from lema.config import seed_problems
from lema.domain.families import registry
from lema.domain.model import blocks, heads
from lema.domain.model.context import make_decode_context
from lema.domain.nn.context import SLIDING
from lema.domain.model.decode import KV, decoder_block_cached
from lema.domain.schedule.layer_schedule import Phase
from lema.domain.units import format_size
from lema.errors import ConfigError, DeviceOutOfMemory

if TYPE_CHECKING:
    from lema.app.training.trainable import StreamedModel as LemaModel  # the surface it reads
    from lema.domain.model.spec import ModelSpec


def generate(model: "LemaModel", input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
             max_new_tokens: int = 32, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
             stream: Callable[[int], None] | None = None) -> torch.Tensor:
    """Continue ``input_ids`` by up to ``max_new_tokens`` tokens with the model's base + adapters.

    Args:
        model: the :class:`~lema.app.training.model.LemaModel` (its adapters are used when it has any).
        input_ids: ``(batch, prompt)`` or ``(prompt,)`` token ids; padded rows must be
            left-padded (real tokens at the end), as for transformers' decoder-only models.
        max_new_tokens: most tokens to add per row.
        do_sample: sample from the distribution instead of taking the most likely token.
        temperature: divides the logits before sampling (> 0).
        top_k: keep only the ``top_k`` most likely tokens when sampling (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches
            ``top_p`` when sampling (1: all).
        seed: seeds the sampling generator (reproducible samples); None uses torch's global RNG.
        eos_token_id: token id(s) that end a row.
        pad_token_id: what a finished row emits (default: the first ``eos_token_id``).
        attention_mask: ``(batch, prompt)`` 1 for tokens and 0 for (left) padding.
        stream: called with each new token id as soon as it is chosen (single-row batches
            only), e.g. to print text while it is generated.

    Returns:
        ``(batch, prompt + generated)`` int64 ids on the CPU; fewer than ``max_new_tokens``
        columns are added when every row finished early.

    Raises:
        ConfigError: invalid options, ids outside the vocabulary, a right-padded prompt, or
            a GPT-2 sequence longer than its learned positions.
        DeviceOutOfMemory: the KV cache for ``prompt + max_new_tokens`` tokens would not fit
            the device's capacity (checked before any compute).
    """
    spec = model.spec
    ids = _as_ids(input_ids)
    batch, prompt_len = ids.shape
    mask = None if attention_mask is None else _as_ids(attention_mask, "attention_mask")
    eos = _eos_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    _check(model, ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p, pad, stream)
    if seed is not None and seed_problems(seed):
        raise ConfigError("generate: " + seed_problems(seed)[0])
    if max_new_tokens == 0:
        return ids.clone()
    _check_cache_fits(model, batch, prompt_len + max_new_tokens)
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    finished = torch.zeros(batch, dtype=torch.bool)
    eos_tensor = torch.tensor(eos, dtype=torch.long)
    # The shell owns the per-layer entries and replaces each one as its layer is computed, so
    # a layer's old keys and values are freed during the pass instead of living until its end.
    layers: list[KV | None] = [None] * spec.n_layers
    new, out, past = ids, [ids], 0
    reset = _cache_reset_length(spec)
    try:
        for step in range(max_new_tokens):
            if reset is not None and 0 < past <= reset < past + new.shape[1]:
                # As transformers' Phi-3: crossing the original length switches LongRoPE to its long
                # factors, so the cache (rotated with the short ones) is dropped and the sequence recomputed.
                layers[:] = [None] * spec.n_layers
                new, past = torch.cat(out, dim=1), 0
            logits = _forward_step(model, new, mask, layers, past)
            past += new.shape[1]
            token = choose_tokens(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator)
            if eos:
                token = torch.where(finished, torch.full_like(token, pad), token)
            if stream is not None and not bool(finished[0]):
                stream(int(token[0]))
            if eos:
                finished |= torch.isin(token, eos_tensor)
            out.append(token[:, None])
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            new = token[:, None]
            if mask is not None:
                mask = torch.cat((mask, torch.ones(batch, 1, dtype=mask.dtype)), dim=1)
    finally:
        layers.clear()  # the cache's device memory goes now, also when a step failed
    return torch.cat(out, dim=1)


def choose_tokens(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of every row from ``(batch, vocab)`` logits.

    Greedy takes the ``argmax``; sampling applies temperature, top-k and top-p (in that
    order, as transformers' logits warpers do) and draws with ``generator``.

    Example:
        >>> choose_tokens(torch.tensor([[0.1, 2.0, -1.0]]))
        tensor([1])
        >>> choose_tokens(torch.tensor([[0.1, 2.0, -1.0]]), do_sample=True, top_k=1)
        tensor([1])
    """
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits / float(temperature)
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p
        drop[..., -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _cache_reset_length(spec: "ModelSpec") -> int | None:
    """LongRoPE's original length, where transformers drops the cache of a family that says so
    (the family record's ``longrope_cache_reset``: Phi-3); None otherwise."""
    if not registry.family(spec.family).longrope_cache_reset:
        return None
    for _, rope in registry.params_of(spec).layout.ropes:
        if rope.rope_type == "longrope":
            return int(rope.get("original_max_position_embeddings"))
    return None


def _forward_step(model: "LemaModel", ids: torch.Tensor, mask: torch.Tensor | None,
                  layers: list[KV | None], past: int) -> torch.Tensor:
    """One engine pass over ``ids`` following ``past`` cached tokens; updates ``layers``; last logits on the CPU."""
    spec, lora = model.spec, model.lora
    batch, new = ids.shape
    dev = model.device.torch_device
    ctx = make_decode_context(spec, batch, past, new, attention_mask=mask, device=dev, dtype=model.compute_dtype,
                              lora=model.lora_spec, matmul_dtype=model.matmul_dtype)
    # As in LemaModel: the embedding rows are gathered on the host; only (batch, new, hidden) moves.
    host_ctx = ctx if model.device.traits.host_memory else make_decode_context(
        spec, batch, past, new, attention_mask=mask, dtype=model.compute_dtype)
    state = {"x": blocks.embed(spec, model.embedding, ids, host_ctx).to(model.compute_dtype).to(dev)}

    def compute(phase: Phase, unit: int, weights: object) -> None:
        weights = model.cast_weights(weights)
        if unit == spec.n_layers + 1:
            state["logits"] = heads.head_logits(spec, weights, state["x"][:, -1:], ctx.matmul_dtype)[:, -1]
            return
        layer = unit - 1
        adapters = lora.layer(layer) if lora is not None else None
        state["x"], layers[layer] = decoder_block_cached(spec, weights, adapters, state["x"], ctx, layer,
                                                         layers[layer])

    with torch.no_grad():
        model.last_report = model.engine.run(compute, mode="forward")
    return state["logits"].float().cpu()


def kv_cache_bytes(model: "LemaModel", batch: int, tokens: int) -> int:
    """Bytes of the KV cache for ``batch`` rows of ``tokens`` tokens in the compute dtype (a
    sliding-window layer holds at most its window)."""
    spec = model.spec
    layout = registry.params_of(spec).layout
    itemsize = torch.empty((), dtype=model.compute_dtype).element_size()
    held = sum(min(tokens, layout.sliding_window) if kind == SLIDING and layout.sliding_window else tokens
               for kind in layout.layer_types)
    return 2 * held * batch * spec.n_kv_heads * spec.head_dim * itemsize


def _check_cache_fits(model: "LemaModel", batch: int, tokens: int) -> None:
    capacity = model.device.capacity
    need = kv_cache_bytes(model, batch, tokens)
    if capacity is None:
        return
    used = model.device.current_bytes()
    if used + need > capacity:
        raise DeviceOutOfMemory(
            f"generate: the KV cache for {batch} x {tokens} tokens needs {format_size(need)} ({need} bytes) but "
            f"the device has {format_size(max(capacity - used, 0))} free of {format_size(capacity)}; lower "
            "max_new_tokens, the prompt length or the batch")


def _as_ids(value: object, name: str = "input_ids") -> torch.Tensor:
    return as_batch(value, name).detach().to("cpu", torch.long)


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


def _check(model: "LemaModel", ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int,
           do_sample: bool, temperature: float, top_k: int, top_p: float, pad: int | None,
           stream: Callable[[int], None] | None) -> None:
    spec = model.spec
    problems = []
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        problems.append(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if do_sample and not (math.isfinite(temperature) and temperature > 0):
        problems.append(f"temperature={temperature!r} must be > 0 when sampling (use do_sample=False for greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        problems.append(f"top_k={top_k!r} must be an integer >= 0 (0 keeps every token)")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"top_p={top_p!r} must be in (0, 1]")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= spec.vocab_size:
        problems.append(f"input_ids: token ids must be in [0, {spec.vocab_size}); got {low}..{high} "
                        "(is the tokenizer for this model?)")
    if pad is not None and not 0 <= pad < spec.vocab_size:
        problems.append(f"pad/eos token id {pad} is outside the vocabulary [0, {spec.vocab_size})")
    if mask is not None:
        if mask.shape != ids.shape:
            problems.append(f"attention_mask has shape {list(mask.shape)}, expected {list(ids.shape)}")
        elif bool((mask[:, -1] == 0).any()):
            problems.append("attention_mask: a row ends with padding; pad prompts on the left for generation")
    if stream is not None and ids.shape[0] != 1:
        problems.append(f"stream: needs a single prompt, got a batch of {ids.shape[0]}")
    total = ids.shape[1] + (max_new_tokens if isinstance(max_new_tokens, int) else 0)
    if not registry.params_of(spec).layout.ropes and total > spec.max_positions:
        problems.append(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds "
                        f"this {spec.model_type}'s {spec.max_positions} learned positions")
    if problems:
        raise ConfigError("generate: " + "; ".join(problems))
