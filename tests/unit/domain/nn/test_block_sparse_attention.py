"""Attention without dense masks (issue 23): right padding runs causal SDPA with no mask, packed
rows and sliding windows run per example and per window band, never a ``(seq, seq)`` mask.

The reference is the dense boolean mask LEMA built before (``BlockSparse.dense``, the
transformers mask) and transformers' own logits on the real tokens.
"""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F

from lema.domain.model.blocks import decoder_block, embed
from lema.domain.model.context import make_context
from lema.domain.model.heads import head_logits
from lema.domain.nn.context import BlockSparse, segment_ids
from tests.tiny_models import build_hf_model, spec_of, unit_weights
from tests.tolerance import assert_close, forward_floor, logits_noise

SEQ = 24


class _SdpaSpy:
    """Wraps torch's SDPA and records the shape of every mask it is given (None: no mask)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.masks: list[tuple[int, ...] | None] = []
        self._sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, *args, attn_mask=None, **kwargs):
        self.masks.append(None if attn_mask is None else tuple(attn_mask.shape))
        return self._sdpa(*args, attn_mask=attn_mask, **kwargs)


def _model(kind: str):
    model = build_hf_model(kind, seed=4)
    spec = spec_of(model)
    return model, spec, unit_weights(spec, model.state_dict())


def _logits(spec, units, ids, ctx):
    x = embed(spec, units[0], ids, ctx)
    for i in range(spec.n_layers):
        x = decoder_block(spec, units[i + 1], None, x, ctx, layer=i)
    return head_logits(spec, units[-1], x)


def _dense(ctx):
    """The same context with every BlockSparse replaced by the dense mask it stands for."""
    masks = {k: ((m.dense("cpu") if isinstance(m, BlockSparse) else m), keep) for k, (m, keep) in ctx.masks.items()}
    return attrs.evolve(ctx, masks=masks)


def _right_padded(vocab: int):
    ids = torch.randint(0, vocab, (3, SEQ), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, SEQ - 9:] = 0
    mask[2, SEQ - 1:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_right_padded_batch_builds_no_mask_and_its_real_tokens_match_the_masked_ones(kind, monkeypatch):
    model, spec, units = _model(kind)
    ids, mask = _right_padded(spec.vocab_size)
    ctx = make_context(spec, tuple(ids.shape), attention_mask=mask)
    assert all(m is None and keep is None for m, keep in ctx.masks.values())
    spy = _SdpaSpy(monkeypatch)
    ours = _logits(spec, units, ids, ctx)
    assert spy.masks == [None] * spec.n_layers  # causal SDPA, no (batch, 1, seq, seq) mask
    monkeypatch.undo()

    # the masked attention LEMA computed before: the dense padding mask
    from lema.domain.nn.context import attention_masks

    dense = attrs.evolve(ctx, masks={k: attention_masks(mask.bool(), SEQ, None, torch.device("cpu"))
                                     for k in ctx.masks})
    masked = _logits(spec, units, ids, dense)
    real = mask.bool()
    floor = forward_floor(spec, SEQ)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    noise = logits_noise(model, ids, mask, select=real)
    assert_close(ours[real], masked[real], noise=noise, floor=floor, what="masked")
    assert_close(ours[real], expected[real], noise=noise, floor=floor, what="transformers")


def test_a_right_padded_batch_trains_as_the_masked_one():
    """Gradients too: padded positions carry no loss and no real token sees them."""
    from lema.domain.nn.context import attention_masks

    _, spec, units = _model("llama")
    ids, mask = _right_padded(spec.vocab_size)
    ctx = make_context(spec, tuple(ids.shape), attention_mask=mask)
    dense = attrs.evolve(ctx, masks={k: attention_masks(mask.bool(), SEQ, None, torch.device("cpu"))
                                     for k in ctx.masks})
    grads = []
    for c in (ctx, dense):
        x = embed(spec, units[0], ids, c).detach().requires_grad_(True)
        h = x
        for i in range(spec.n_layers):
            h = decoder_block(spec, units[i + 1], None, h, c, layer=i)
        logits = head_logits(spec, units[-1], h)
        labels = ids.masked_fill(mask == 0, -100)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)).backward()
        grads.append(x.grad[mask.bool()])
    assert_close(grads[0], grads[1], floor=forward_floor(spec, SEQ, extra=2), what="input gradient")


@pytest.mark.parametrize("kind,padded", [("llama", False), ("mistral", False), ("mistral", True),
                                         ("qwen2_window", True)])
def test_packed_rows_and_sliding_windows_attend_by_blocks_and_match_the_dense_mask(kind, padded, monkeypatch):
    """Packed rows (three examples, one longer than the window) and windows of 5 over 24 tokens:
    no SDPA call sees a mask larger than (window, 2 window); the logits are the dense mask's."""
    model, spec, units = _model(kind)
    positions = torch.tensor([list(range(10)) + list(range(3)) + list(range(11)),
                              list(range(SEQ))])
    ids = torch.randint(0, spec.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(8))
    mask = None
    if padded:
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, SEQ - 6:] = 0
    ctx = make_context(spec, (2, SEQ), attention_mask=mask, position_ids=positions, segments=segment_ids(positions))
    window = ctx.params.layout.sliding_window
    for m, keep in ctx.masks.values():
        assert isinstance(m, BlockSparse) and keep is None
    spy = _SdpaSpy(monkeypatch)
    ours = _logits(spec, units, ids, ctx)
    largest = max((s[-2] * s[-1] for s in spy.masks if s is not None), default=0)
    assert largest <= (window or 0) * 2 * (window or 0)
    monkeypatch.undo()
    dense = _logits(spec, units, ids, _dense(ctx))
    real = torch.ones(2, SEQ, dtype=torch.bool) if mask is None else mask.bool()
    assert_close(ours[real], dense[real], floor=forward_floor(spec, SEQ), what=kind)


def test_a_window_shorter_than_the_sequence_matches_transformers_without_a_dense_mask(monkeypatch):
    model, spec, units = _model("mistral")
    ids = torch.randint(0, spec.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(9))
    ctx = make_context(spec, (2, SEQ))
    mask, _ = ctx.attention("sliding_attention") if "sliding_attention" in ctx.masks else ctx.attention(
        "full_attention")
    assert isinstance(mask, BlockSparse) and mask.window == 5 and mask.spans is None
    spy = _SdpaSpy(monkeypatch)
    ours = _logits(spec, units, ids, ctx)
    assert all(s is None or s[-2] * s[-1] <= 5 * 10 for s in spy.masks)
    monkeypatch.undo()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert_close(ours, expected, noise=logits_noise(model, ids), floor=forward_floor(spec, SEQ), what="mistral")


def _left_padded(vocab: int):
    ids = torch.randint(0, vocab, (3, SEQ), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, :9] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen2_window"])
def test_a_left_padded_batch_builds_no_mask_and_its_logits_are_transformers(kind, monkeypatch):
    """Each row's real tokens attend causally among themselves (by window bands where the
    window is shorter), its padding outputs zeros: no SDPA call sees a (batch, 1, seq, seq)
    mask, and every position's logits, the padded ones too, are transformers'."""
    model, spec, units = _model(kind)
    ids, mask = _left_padded(spec.vocab_size)
    ctx = make_context(spec, tuple(ids.shape), attention_mask=mask)
    for m, keep in ctx.masks.values():
        assert isinstance(m, BlockSparse) and m.lead == (0, 9, 1) and keep is None
    window = ctx.params.layout.sliding_window or 0
    spy = _SdpaSpy(monkeypatch)
    ours = _logits(spec, units, ids, ctx)
    assert spy.masks and all(s is None or s[-2] * s[-1] <= window * 2 * window for s in spy.masks), spy.masks
    monkeypatch.undo()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    noise = logits_noise(model, ids, mask)
    assert_close(ours, expected, noise=noise, floor=forward_floor(spec, SEQ), what="transformers")


def test_a_left_padded_batch_trains_as_the_dense_mask():
    """Gradients equal the dense mask's (``BlockSparse.dense`` and its ``keep``: the mask
    :func:`attention_masks` builds), for every position's input."""
    from lema.domain.nn.context import attention_masks

    _, spec, units = _model("llama")
    ids, mask = _left_padded(spec.vocab_size)
    ctx = make_context(spec, tuple(ids.shape), attention_mask=mask)
    (sparse, _), = {id(m): (m, k) for m, k in ctx.masks.values()}.values()
    dense_mask, keep = attention_masks(mask.bool(), SEQ, None, torch.device("cpu"))
    assert torch.equal(sparse.dense("cpu"), dense_mask) and torch.equal(sparse.keep("cpu"), keep)
    dense = attrs.evolve(ctx, masks={k: (dense_mask, keep) for k in ctx.masks})
    grads = []
    for c in (ctx, dense):
        x = embed(spec, units[0], ids, c).detach().requires_grad_(True)
        h = x
        for i in range(spec.n_layers):
            h = decoder_block(spec, units[i + 1], None, h, c, layer=i)
        logits = head_logits(spec, units[-1], h)
        labels = ids.masked_fill(mask == 0, -100)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)).backward()
        grads.append(x.grad)
    assert_close(grads[0], grads[1], floor=forward_floor(spec, SEQ, extra=2), what="input gradient")


def test_a_left_padded_prefill_builds_no_mask_and_its_logits_are_the_dense_masks(monkeypatch):
    """Generation's prefill (no cached keys) of left-padded prompts takes the training batch's
    masks; the steps after it keep their (batch, 1, new, keys) masks over the cache."""
    from lema.domain.model.context import make_decode_context
    from lema.domain.nn.context import attention_masks

    _, spec, units = _model("mistral")
    ids, mask = _left_padded(spec.vocab_size)
    ctx = make_decode_context(spec, 3, 0, SEQ, attention_mask=mask)
    for m, keep in ctx.masks.values():
        assert isinstance(m, BlockSparse) and m.lead == (0, 9, 1) and keep is None
    spy = _SdpaSpy(monkeypatch)
    ours = _logits(spec, units, ids, ctx)
    window = ctx.params.layout.sliding_window
    assert all(s is None or s[-2] * s[-1] <= window * 2 * window for s in spy.masks)
    monkeypatch.undo()
    dense = attrs.evolve(ctx, masks={k: attention_masks(mask.bool(), SEQ, window if k == "sliding_attention" else None,
                                                        torch.device("cpu")) for k in ctx.masks})
    assert_close(ours, _logits(spec, units, ids, dense), floor=forward_floor(spec, SEQ), what="prefill")
    step = make_decode_context(spec, 3, SEQ, 1, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1))
    assert all(isinstance(m, torch.Tensor) for m, _ in step.masks.values())
