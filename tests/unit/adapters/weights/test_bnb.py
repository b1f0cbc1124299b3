"""The bitsandbytes boundary against bitsandbytes itself: quantizing in chunks gives the bytes of
one ``quantize_4bit`` / ``int8_vectorwise_quant`` call, and dequantizing gives its weights."""

from __future__ import annotations

import pytest
import torch

from lema.adapters.weights import bnb
from lema.domain.nn.quant import QuantFormat, packed_weight, stored_tensors
from tests.tolerance import assert_close, rounding_floor

BF = pytest.importorskip("bitsandbytes.functional")
FORMATS = [QuantFormat("nf4"), QuantFormat("nf4", True), QuantFormat("fp4"), QuantFormat("fp4", True),
           QuantFormat("int8")]


def _reference(w: torch.Tensor, fmt: QuantFormat) -> dict[str, torch.Tensor]:
    if fmt.bits == 8:
        cb, scb, _ = BF.int8_vectorwise_quant(w.to(torch.float16))
        return {"m.weight": cb, "m.SCB": scb, "m.weight_format": torch.tensor(0, dtype=torch.uint8)}
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type=fmt.method, compress_statistics=fmt.double_quant,
                                     quant_storage=torch.uint8)
    return {"m.weight": packed, **{f"m.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label)
@pytest.mark.parametrize("shape", [(33, 65), (7, 9), (96, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_quantization_is_bit_identical_and_dequantizes_as_bitsandbytes(fmt, shape, dtype):
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    ours = bnb.quantize(w, "m.weight", fmt, chunk_elements=128)  # many chunks, a partial block last
    reference = _reference(w, fmt)
    assert set(ours) == set(reference)
    for k, v in reference.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), k
    expected_layout = {k: (code, s) for k, code, s in stored_tensors("m.weight", shape, fmt, dtype="F32")}
    assert {k: tuple(v.shape) for k, v in ours.items() if ".quant_state." not in k} == \
        {k: s for k, (_, s) in expected_layout.items() if ".quant_state." not in k}

    weight = packed_weight("m.weight", shape, fmt)
    if fmt.bits == 8:
        state = bnb.QuantState(fmt, weight.shape)
        expected = BF.int8_vectorwise_dequant(reference["m.weight"], reference["m.SCB"])
    else:
        blob = weight.stored[-1]
        state = bnb.parse_quant_state(ours[blob].numpy().tobytes(), blob, weight)
        qs = BF.QuantState.from_dict({k.removeprefix("m.weight."): v.clone() for k, v in reference.items()
                                      if k != "m.weight"}, device=torch.device("cpu"))
        qs.dtype = torch.float32
        expected = BF.dequantize_4bit(reference["m.weight"], qs)
    got = bnb.dequantize(weight, ours, state, torch.float32)
    if fmt.bits == 4:  # the same table look-up and product as bitsandbytes'
        assert torch.equal(got, expected)
    else:  # int8: a scale and a product in another order, each rounded once in fp32
        assert_close(got, expected, floor=rounding_floor(torch.float32, 1, depth=2))
    out = torch.empty(shape, dtype=torch.bfloat16)
    assert bnb.dequantize(weight, ours, state, torch.bfloat16, out=out) is out
    if fmt.bits == 4:
        assert torch.equal(out, expected.to(torch.bfloat16))
    else:  # and rounded to bf16
        assert_close(out, expected, floor=rounding_floor(torch.bfloat16, 1, depth=2))


def test_a_corrupt_quant_state_is_named():
    from lema.errors import ModelFormatError

    weight = packed_weight("m.weight", (32, 64), QuantFormat("nf4"))
    with pytest.raises(ModelFormatError, match="not a bitsandbytes quantization state"):
        bnb.parse_quant_state(b"\xff\x00", "m.weight.quant_state.bitsandbytes__nf4", weight)
    with pytest.raises(ModelFormatError, match=r"shape \[64, 32\], the config implies \[32, 64\]"):
        bnb.parse_quant_state(b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 32]}',
                              "m.weight.quant_state.bitsandbytes__nf4", weight)


@pytest.mark.parametrize("fmt", FORMATS[:4], ids=lambda f: f.label)
@pytest.mark.parametrize("stored,compute", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                            (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_the_two_roundings_are_bitsandbytes_forward_and_backward_ones(fmt, stored, compute):
    """bitsandbytes' 4-bit product (``MatMul4Bit``) dequantizes into the activations' dtype in its
    forward (``gemm_4bit``) and into the quant state's dtype, then casts, in its backward
    (``dequantize_4bit(B, state).to(grad.dtype)``): LEMA's two roundings are those, to the bit."""
    shape = (48, 128)
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.05).to(stored)
    tensors = bnb.quantize(w, "m.weight", fmt)
    weight = packed_weight("m.weight", shape, fmt)
    blob = weight.stored[-1]
    state = bnb.parse_quant_state(tensors[blob].numpy().tobytes(), blob, weight)
    assert state.torch_stored_dtype == stored
    assert bnb.rounds_twice(state, compute) == (stored != compute)
    qs = BF.QuantState.from_dict({k.removeprefix("m.weight."): v.clone() for k, v in tensors.items()
                                  if k != "m.weight"}, device=torch.device("cpu"))
    assert qs.dtype == stored
    backward = BF.dequantize_4bit(tensors["m.weight"], qs).to(compute)
    assert torch.equal(bnb.dequantize(weight, tensors, state, compute, through_stored=True), backward)
    out = torch.empty(shape, dtype=compute)
    assert bnb.dequantize(weight, tensors, state, compute, out=out, through_stored=True) is out
    assert torch.equal(out, backward)

    eye = torch.eye(shape[1], dtype=compute)  # I @ W.T: every sum has one non-zero term, exact
    nested = dict(absmax_8bit=qs.absmax, absmax_code=qs.state2.code, absmax_offset=qs.offset) if qs.nested else {}
    forward = torch.ops.bitsandbytes.gemm_4bit.default(eye, tensors["m.weight"], list(shape),
                                                       qs.state2.absmax if qs.nested else qs.absmax, 64,
                                                       fmt.method, **nested).t()
    assert torch.equal(bnb.dequantize(weight, tensors, state, compute), forward)
    if compute == torch.float32 and stored != compute:  # the two differ: this test tells them apart
        assert not torch.equal(forward, backward)
