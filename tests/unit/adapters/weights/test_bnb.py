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
