"""The KV-cached decoder layer equals recomputing the whole prefix (every architecture)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.domain.model.blocks import decoder_block
from lema.domain.model.context import make_context, make_decode_context
from lema.domain.model.decode import KVCache, decoder_block_cached
from lema.domain.model.lora import LoraSpec, init_lora
from lema.domain.nn.context import decode_position_ids
from lema.errors import ConfigError
from tests.tiny_models import KINDS as ALL_KINDS
from tests.tiny_models import build_hf_model, spec_of, unit_weights
from tests.tolerance import assert_close, order_noise, rounding_floor

# LongRoPE's frequencies depend on the longest position of each call: a cache filled by short
# calls differs from one recompute (transformers' generate behaves the same way).
KINDS = tuple(k for k in ALL_KINDS if k != "llama_longrope")

SEQ = 12  # longer than mistral's sliding window (5), so the window matters


def cache_layout(spec):
    from lema.domain.families import registry

    return registry.params_of(spec).layout


@functools.lru_cache(maxsize=None)
def _model(kind: str):
    hf = build_hf_model(kind, seed=2)
    spec = spec_of(hf)
    return spec, unit_weights(spec, hf.state_dict())


def _lora(spec):
    lora = init_lora(spec, LoraSpec(rank=4, alpha=8.0), seed=0)
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for p in lora.parameters():
            p.normal_(0.0, 0.05)
    return lora


def _full(spec, weights, lora, x, mask=None):
    """The reference: every layer over the whole sequence, no cache."""
    positions = decode_position_ids(mask, 0, x.shape[1])
    ctx = make_context(spec, tuple(x.shape[:2]), attention_mask=mask, position_ids=positions,
                       lora=LoraSpec(rank=4, alpha=8.0))
    for layer in range(spec.n_layers):
        x = decoder_block(spec, weights[layer + 1], lora.layer(layer) if lora else None, x, ctx, layer)
    return x


def _cached(spec, weights, lora, x, chunks, mask=None):
    """Prefill then steps of ``chunks`` tokens through the cache; the outputs concatenated."""
    cache, outs, start = KVCache.empty(spec.n_layers), [], 0
    for n in chunks:
        part = mask[:, :start + n] if mask is not None else None
        ctx = make_decode_context(spec, x.shape[0], start, n, attention_mask=part, lora=LoraSpec(rank=4, alpha=8.0))
        h = x[:, start:start + n]
        for layer in range(spec.n_layers):
            h, kv = decoder_block_cached(spec, weights[layer + 1], lora.layer(layer) if lora else None, h, ctx,
                                         layer, cache.past(layer))
            cache = cache.with_layer(layer, kv)
        outs.append(h)
        start += n
        cache = cache.advanced(n)
        assert cache.past_len == start
        layout = ctx.params.layout
        for kind, (keys, _) in zip(layout.layer_types, cache.layers):  # sliding layers keep window - 1 keys
            assert keys.shape[2] == (min(start, layout.sliding_window - 1) if kind == "sliding_attention" else start)
    return torch.cat(outs, dim=1), cache


def _check(got, spec, weights, lora, x, mask=None, select=None):
    """``got`` against :func:`_full` under the tolerance rule: the full recompute's own order
    noise (one thread; the rows one by one) and the floor of the layers' sums."""
    pick = (lambda t: t) if select is None else (lambda t: t[select])
    full = functools.partial(_full, spec, weights, lora)

    def rows():
        return pick(torch.cat([full(x[r:r + 1], None if mask is None else mask[r:r + 1]) for r in range(len(x))]))

    expected = pick(full(x, mask))
    noise = order_noise(lambda: pick(full(x, mask)), baseline=expected, split=rows if len(x) > 1 else None)
    floor = rounding_floor(torch.float32, max(spec.hidden_size, spec.intermediate_size, x.shape[1]), spec.n_layers)
    assert_close(pick(got), expected, noise=noise, floor=floor)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapters", [False, True], ids=["base", "lora"])
def test_prefill_then_one_token_steps_equal_the_full_recompute(kind, adapters):
    spec, weights = _model(kind)
    lora = _lora(spec) if adapters else None
    x = torch.randn(2, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    got, cache = _cached(spec, weights, lora, x, [4] + [1] * (SEQ - 4))
    _check(got, spec, weights, lora, x)
    k, v = cache.past(0)
    layout = cache_layout(spec)
    held = min(SEQ, layout.sliding_window - 1) if layout.layer_types[0] == "sliding_attention" else SEQ
    assert k.shape == v.shape == (2, spec.n_kv_heads, held, spec.head_dim)
    assert k.dtype == torch.float32
    assert cache.nbytes == sum(2 * kv[0].numel() * 4 for kv in cache.layers)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_rows_match_the_full_recompute_on_real_tokens(kind):
    spec, weights = _model(kind)
    x = torch.randn(3, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    got, _ = _cached(spec, weights, None, x, [7, 1, 2, 1, 1], mask)
    _check(got, spec, weights, None, x, mask, select=mask.bool())


@settings(max_examples=15)
@given(chunks=st.lists(st.integers(1, 4), min_size=1, max_size=SEQ).filter(lambda c: sum(c) <= SEQ))
def test_any_split_of_the_sequence_gives_the_same_outputs(chunks):
    spec, weights = _model("mistral")  # sliding window: the hardest mask
    x = torch.randn(1, sum(chunks), spec.hidden_size, generator=torch.Generator().manual_seed(3))
    _check(_cached(spec, weights, None, x, chunks)[0], spec, weights, None, x)


def test_decode_positions_follow_transformers_generate():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert decode_position_ids(mask, 0, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert decode_position_ids(mask, 4, 1).tolist() == [[2], [4]]
    assert decode_position_ids(None, 3, 2).tolist() == [[3, 4]]


def test_a_context_for_the_wrong_past_length_is_refused():
    spec, weights = _model("llama")
    x = torch.randn(1, 4, spec.hidden_size)
    _, kv = decoder_block_cached(spec, weights[1], None, x, make_decode_context(spec, 1, 0, 4))
    wrong = make_decode_context(spec, 1, 2, 2)  # claims 2 cached tokens; the cache has 4
    with pytest.raises(ConfigError, match="make_decode_context"):
        decoder_block_cached(spec, weights[1], None, x[:, :2], wrong, 0, kv)


def test_bad_decode_context_arguments_are_named():
    spec, _ = _model("llama")
    with pytest.raises(ConfigError, match="past_len=-1.*new_len=0"):
        make_decode_context(spec, 1, -1, 0)
    with pytest.raises(ConfigError, match="attention_mask"):
        make_decode_context(spec, 1, 3, 1, attention_mask=torch.ones(1, 3))
