"""A tiled layer equals the untiled one: outputs, input gradients and LoRA gradients.

The untiled :func:`decoder_block` is checked against transformers and peft elsewhere
(test_blocks, test_lora, the families' tests); here the tiled forward and backward must
agree with it for every family (sliding windows, soft-capped eager attention, partial
rotary, routed experts, fused projections, GPT-2's Conv1D), with padding and any tile size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import family_models  # noqa: E402
from tiny_models import build_hf_model, spec_of, unit_weights  # noqa: E402
from tolerance import assert_close, rounding_floor  # noqa: E402

from lema.domain.families import registry  # noqa: E402
from lema.domain.model.blocks import decoder_block  # noqa: E402
from lema.domain.model.context import make_context  # noqa: E402
from lema.domain.model.lora import LoraSpec, init_lora  # noqa: E402
from lema.domain.model.tiling import spans, tiled_backward, tiled_forward  # noqa: E402
from lema.errors import ConfigError  # noqa: E402

SEQ = 13
CASES = ("llama", "mistral", "qwen2_window", "gpt2", *[f for f in family_models.FAMILIES if f != "llama"])


@pytest.fixture(scope="module", params=CASES)
def layer(request):
    name = request.param
    model = family_models.build(name, seed=4) if name in family_models.FAMILIES else build_hf_model(name, seed=4)
    spec = spec_of(model)
    layer_index = 1 if spec.n_layers > 1 else 0  # layer 1: the sliding or MoE one where a family has them
    weights = _random_weights(spec, layer_index, gemma=name.startswith("gemma"))
    lora_spec = LoraSpec(rank=4, alpha=8.0, targets=registry.default_targets(spec.family))
    state = init_lora(spec, lora_spec, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B starts at zero; give it values so both A and B get gradients
        for _, b in state.layer(layer_index).values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return name, spec, weights, lora_spec, state, layer_index


def _random_weights(spec, layer: int, gemma: bool) -> dict[str, torch.Tensor]:
    """Random tensors of the layer's shapes (the comparison is tiled vs untiled, not vs a file)."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    for t in spec.units[layer + 1].tensors:
        noise = torch.randn(t.shape, generator=gen)
        if "norm" in t.key or "ln_" in t.key:
            out[t.key] = noise * 0.2 + (0.0 if gemma else 1.0)
        else:
            out[t.key] = noise * (0.1 if t.key.endswith("bias") else 0.08)
    return out


def _mask(padding: str | None) -> torch.Tensor | None:
    if padding is None:
        return None
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :4] = 0
    return mask


def _close(got: torch.Tensor, want: torch.Tensor, spec, dtype: torch.dtype = torch.float32) -> None:
    """Equal up to rounding (tests/tolerance.py): tiles split each sum over tokens, so the
    floor is the layer's longest sum, forward and backward."""
    assert got.shape == want.shape
    assert_close(got, want, floor=rounding_floor(dtype, max(spec.hidden_size, spec.intermediate_size, SEQ), depth=2))


def _grads(state, layer: int) -> list[torch.Tensor]:
    out = []
    for a, b in state.layer(layer).values():
        out += [a.grad.clone(), b.grad.clone()]
        a.grad, b.grad = None, None
    return out


@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("tile", [1, 5])
def test_tiled_forward_and_backward_equal_the_untiled_layer(layer, padding, tile):
    name, spec, weights, lora_spec, state, i = layer
    ctx = make_context(spec, (2, SEQ), attention_mask=_mask(padding), lora=lora_spec, training=True)
    x = torch.randn(2, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(5))
    grad_out = torch.randn(2, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(6))
    adapters = state.layer(i)

    x_ref = x.clone().requires_grad_(True)
    out_ref = decoder_block(spec, weights, adapters, x_ref, ctx, i)
    torch.autograd.backward(out_ref, grad_out)
    expected = _grads(state, i)

    out = tiled_forward(spec, weights, adapters, x, ctx, i, tile)
    assert not out.requires_grad
    _close(out, out_ref.detach(), spec)
    grad = grad_out.clone()
    grad_x = tiled_backward(spec, weights, adapters, x, grad, ctx, i, tile)
    assert grad_x is grad  # the incoming gradient's buffer carries the result
    _close(grad_x, x_ref.grad, spec)
    for got, want in zip(_grads(state, i), expected):
        _close(got, want, spec)


def test_tiles_with_dropout_redraw_the_same_masks_in_the_recompute(layer):
    """With LoRA dropout a tiled forward and the tiled recompute agree (same masks per tile)."""
    name, spec, weights, lora_spec, state, i = layer
    dropped = LoraSpec(rank=4, alpha=8.0, dropout=0.3, targets=lora_spec.targets)
    ctx = make_context(spec, (1, SEQ), lora=dropped, training=True, dropout_seed=11)
    x = torch.randn(1, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        first = tiled_forward(spec, weights, state.layer(i), x, ctx, i, 4)
        again = tiled_forward(spec, weights, state.layer(i), x, ctx, i, 4)
        untiled = decoder_block(spec, weights, state.layer(i), x, ctx, i)
    assert torch.equal(first, again)
    assert not torch.allclose(first, untiled)  # the tiles draw their own masks


def test_each_adapter_gradient_is_accumulated_once_per_layer_backward(layer):
    """Post-accumulate-grad hooks (data parallel's gradient buckets) run once per tensor, with
    the sum over all tiles, as for an untiled layer."""
    name, spec, weights, lora_spec, state, i = layer
    ctx = make_context(spec, (2, SEQ), lora=lora_spec, training=True)
    x = torch.randn(2, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(5))
    grad_out = torch.randn(2, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(6))
    params = [t for pair in state.layer(i).values() for t in pair]
    seen: list[tuple[int, torch.Tensor]] = []
    handles = [p.register_post_accumulate_grad_hook(lambda t, j=j: seen.append((j, t.grad.clone())))
               for j, p in enumerate(params)]
    try:
        tiled_backward(spec, weights, state.layer(i), x, grad_out.clone(), ctx, i, 3)
    finally:
        for h in handles:
            h.remove()
    final = _grads(state, i)
    used = [j for j, g in enumerate(final) if g is not None]
    assert sorted(j for j, _ in seen) == used and len(used) == len(params)  # each once
    for j, g in seen:
        assert torch.equal(g, final[j])  # the hook saw the whole layer's gradient


def test_bf16_tiles_with_wide_products_match_the_untiled_layer():
    """bf16 activations with fp32 products (a CPU without fast bf16) tile like fp32 ones."""
    model = build_hf_model("llama", seed=4)
    spec = spec_of(model)
    weights = {k: v.bfloat16() for k, v in unit_weights(spec, model.state_dict())[1].items()}
    lora_spec = LoraSpec(rank=4, alpha=8.0)
    state = init_lora(spec, lora_spec, seed=1)
    with torch.no_grad():
        for _, b in state.layer(0).values():
            b.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    ctx = make_context(spec, (2, SEQ), lora=lora_spec, training=True, dtype=torch.bfloat16,
                       matmul_dtype=torch.float32)
    x = torch.randn(2, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(8)).bfloat16()
    grad_out = torch.randn(2, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(9)).bfloat16()
    x_ref = x.clone().requires_grad_(True)
    torch.autograd.backward(decoder_block(spec, weights, state.layer(0), x_ref, ctx, 0), grad_out)
    expected = _grads(state, 0)
    grad_x = tiled_backward(spec, weights, state.layer(0), x, grad_out.clone(), ctx, 0, 4)
    _close(grad_x, x_ref.grad, spec, torch.bfloat16)
    for got, want in zip(_grads(state, 0), expected):
        _close(got, want, spec, torch.bfloat16)


def test_spans_cover_the_sequence_once():
    assert spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert spans(3, 8) == [(0, 3)]
    with pytest.raises(ConfigError, match="tile"):
        spans(3, 0)


def test_split_weights_backward_roundings_survive_tiles():
    """A quantized base's weights whose backward multiplies by another rounding
    (lema.domain.nn.linear.SplitWeights): tiled and untiled layers use it alike."""
    from lema.domain.nn.linear import SplitWeights

    spec = spec_of(build_hf_model("llama", seed=4))
    plain = _random_weights(spec, 0, gemma=False)
    linears = [k for k, t in plain.items() if t.dim() == 2]
    weights = SplitWeights(plain, {k: (lambda k=k: plain[k].to(torch.bfloat16).to(torch.float32)) for k in linears})
    ctx = make_context(spec, (2, SEQ), training=True)
    x = torch.randn(2, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(5))
    grad_out = torch.randn(2, SEQ, spec.hidden_size, generator=torch.Generator().manual_seed(6))
    grads = {}
    for name, w in (("split", weights), ("plain", plain)):
        x_ref = x.clone().requires_grad_(True)
        torch.autograd.backward(decoder_block(spec, w, None, x_ref, ctx, 0), grad_out)
        grads[name] = x_ref.grad
    assert not torch.equal(grads["split"], grads["plain"])  # the backward's rounding is used
    tiled = tiled_backward(spec, weights, None, x, grad_out.clone(), ctx, 0, 5)
    _close(tiled, grads["split"], spec)
