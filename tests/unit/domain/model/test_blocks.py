"""The functional blocks agree with transformers: logits, masks, rope variants and the loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tiny_models import KINDS, build_hf_model, spec_of, unit_weights  # noqa: E402
from tests.tolerance import assert_close, forward_floor, logits_noise, rounding_floor  # noqa: E402

from lema.domain.model.blocks import decoder_block, embed  # noqa: E402
from lema.domain.model.context import make_context  # noqa: E402
from lema.domain.model.heads import head_logits, head_loss, shift_labels  # noqa: E402
from lema.errors import ConfigError, ModelFormatError  # noqa: E402

SEQ = 12
F32 = torch.float32


@pytest.fixture(scope="module", params=(*KINDS, "llama_dynamic"))
def reference(request):
    model = build_hf_model(request.param, seed=1)
    spec = spec_of(model)
    return request.param, model, spec, unit_weights(spec, model.state_dict())


def _batch(vocab: int, padding: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, SEQ), generator=gen)
    if padding is None:
        return ids, None
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if padding == "right":
        mask[1, SEQ - 4:] = 0
    else:
        mask[1, :4] = 0
    return ids, mask


def _forward(spec, units, ids, mask=None, lora=None, lora_spec=None):
    ctx = make_context(spec, tuple(ids.shape), attention_mask=mask, lora=lora_spec)
    x = embed(spec, units[0], ids, ctx)
    for i in range(spec.n_layers):
        x = decoder_block(spec, units[i + 1], lora.layer(i) if lora else None, x, ctx, layer=i)
    return x


@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_logits_match_transformers(reference, padding):
    """Embedding + every block + head gives transformers' logits (fp32, within the tolerance
    rule of tests/tolerance.py), padded or not: on every position, except right padding's
    (padded positions carry no loss; LEMA runs mask-free causal attention there)."""
    kind, model, spec, units = reference
    ids, mask = _batch(spec.vocab_size, padding)
    real = torch.ones(2, SEQ, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        ours = head_logits(spec, units[-1], _forward(spec, units, ids, mask))
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    noise, floor = logits_noise(model, ids, mask, select=real), forward_floor(spec, SEQ)
    assert_close(ours[real], expected[real], noise=noise, floor=floor, what=kind)
    assert torch.isfinite(ours).all()
    if padding == "right":  # plain causal attention: padded positions (no loss) see the padding before them
        assert torch.equal(ours, head_logits(spec, units[-1], _forward(spec, units, ids)))
        return
    finite = torch.isfinite(expected).all(-1)
    assert_close(ours[finite], expected[finite], noise=noise, floor=floor, what=kind)


@pytest.mark.parametrize("padding", [None, "left"])
def test_loss_matches_transformers(reference, padding):
    """loss_sum / n_tokens equals transformers' mean loss (tolerance rule), with ignored labels, in chunks."""
    kind, model, spec, units = reference
    ids, mask = _batch(spec.vocab_size, padding)
    labels = ids.clone()
    labels[0, 3:6] = -100
    if mask is not None:
        labels[mask == 0] = -100
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        x = _forward(spec, units, ids, mask)
        loss_sum, n = head_loss(spec, units[-1], x, shift_labels(labels), chunk_tokens=5)
    assert n == int((shift_labels(labels) != -100).sum())
    assert_close(loss_sum / n, expected, floor=forward_floor(spec, max(SEQ, spec.vocab_size), extra=1), what=kind)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_chunked_loss_gradient_equals_plain_autograd(kind):
    """The chunked loss's gradient w.r.t. the hidden states equals autograd through full logits."""
    model = build_hf_model(kind, seed=2)
    spec = spec_of(model)
    units = unit_weights(spec, model.state_dict())
    ids, _ = _batch(spec.vocab_size, None)
    targets = shift_labels(ids)
    targets[1, :3] = -100
    x = torch.randn(2, SEQ, spec.hidden_size, requires_grad=True)
    loss_sum, _ = head_loss(spec, units[-1], x, targets, chunk_tokens=7)
    (grad,) = torch.autograd.grad(loss_sum * 0.5, x)
    x2 = x.detach().requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(head_logits(spec, units[-1], x2).flatten(0, 1), targets.flatten(),
                                              ignore_index=-100, reduction="sum")
    (expected,) = torch.autograd.grad(plain * 0.5, x2)
    floor = rounding_floor(F32, max(spec.vocab_size, spec.hidden_size, 2 * SEQ), depth=2)
    assert_close(loss_sum, plain, floor=floor, what="loss")
    assert_close(grad, expected, floor=floor, what="gradient")


def test_head_loss_lm_head_weight_gradient():
    """When lm_head.weight requires grad, its gradient equals plain autograd's."""
    model = build_hf_model("llama", seed=2)
    spec = spec_of(model)
    head = dict(unit_weights(spec, model.state_dict())[-1])
    w = head["lm_head.weight"].clone().requires_grad_(True)
    x = torch.randn(2, SEQ, spec.hidden_size)
    targets = torch.randint(0, spec.vocab_size, (2, SEQ))
    loss_sum, _ = head_loss(spec, {**head, "lm_head.weight": w}, x, targets, chunk_tokens=4)
    (grad,) = torch.autograd.grad(loss_sum, w)
    w2 = w.detach().requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(head_logits(spec, {**head, "lm_head.weight": w2}, x).flatten(0, 1),
                                              targets.flatten(), reduction="sum")
    (expected,) = torch.autograd.grad(plain, w2)
    assert_close(grad, expected, floor=rounding_floor(F32, max(spec.vocab_size, 2 * SEQ), depth=2))


def test_head_loss_without_grad_keeps_no_graph():
    """Under no_grad the loss is a plain tensor (evaluation computes no gradients)."""
    model = build_hf_model("gpt2")
    spec = spec_of(model)
    units = unit_weights(spec, model.state_dict())
    x = torch.randn(1, SEQ, spec.hidden_size, requires_grad=True)
    with torch.no_grad():
        loss_sum, n = head_loss(spec, units[-1], x, torch.randint(0, spec.vocab_size, (1, SEQ)))
    assert not loss_sum.requires_grad and n == SEQ


def test_bf16_block_runs_and_stays_close_to_fp32():
    """A bf16 compute dtype gives bf16 activations close to the fp32 result."""
    model = build_hf_model("llama")
    spec = spec_of(model)
    units = unit_weights(spec, model.state_dict())
    x = torch.randn(2, SEQ, spec.hidden_size)
    ctx32 = make_context(spec, (2, SEQ))
    ctx16 = make_context(spec, (2, SEQ), dtype=torch.bfloat16)
    out32 = decoder_block(spec, units[1], None, x, ctx32)
    out16 = decoder_block(spec, {k: v.bfloat16() for k, v in units[1].items()}, None, x.bfloat16(), ctx16)
    assert out16.dtype == torch.bfloat16
    # bf16 against fp32 is the dtype's own rounding: the floor of one block's sums in bf16
    assert_close(out16, out32, floor=rounding_floor(torch.bfloat16, spec.intermediate_size), what="bf16")


def test_context_rejects_mismatched_mask_shape():
    """A padding mask of the wrong shape is a ConfigError naming both shapes."""
    spec = spec_of(build_hf_model("llama"))
    with pytest.raises(ConfigError, match=r"attention_mask has shape \[2, 3\], expected \[2, 12\]"):
        make_context(spec, (2, SEQ), attention_mask=torch.ones(2, 3))


def test_unknown_activation_is_a_model_format_error():
    """A config naming an activation LEMA lacks fails with the name and the supported list."""
    from lema.domain.model.blocks import activation

    with pytest.raises(ModelFormatError, match="'swiglu_oai'"):
        activation("swiglu_oai")


def test_gpt2_embedding_of_a_bf16_file_run_as_float32_sums_in_float32():
    """transformers loads a bf16 file with dtype=float32 as float32 weights and sums wte + wpe
    in float32; the sum in bf16 is ~1e-3 off."""
    model = build_hf_model("gpt2", seed=4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float() * 16)  # bf16-representable values, large enough to round
    spec = spec_of(model)
    units = unit_weights(spec, model.state_dict())
    bf16_units = [{k: v.to(torch.bfloat16) for k, v in u.items()} for u in units]  # what the file holds
    ids, _ = _batch(spec.vocab_size, None)
    ctx = make_context(spec, tuple(ids.shape), dtype=torch.float32)
    with torch.no_grad():
        expected = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(SEQ)[None])
    ours = embed(spec, bf16_units[0], ids, ctx)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, expected)
    summed_in_bf16 = (bf16_units[0]["wte.weight"][ids] + bf16_units[0]["wpe.weight"][:SEQ][None]).float()
    assert not torch.equal(summed_in_bf16, expected)
