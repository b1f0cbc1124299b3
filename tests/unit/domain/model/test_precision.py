"""The compute dtype of a float16 model file (issue 23): bf16 where the device has it, float16
with a warning elsewhere or when asked for, every other file its own dtype."""

from __future__ import annotations

import attrs
import pytest

from lema.domain.device_traits import CPU, CUDA
from lema.domain.model.precision import compute_dtype_code


def test_a_float16_file_trains_in_bfloat16_where_the_device_has_it():
    code, warning = compute_dtype_code("F16", "auto", bf16=True)
    assert code == "BF16" and "bfloat16" in warning and 'dtype="float16"' in warning


def test_without_native_bf16_a_float16_file_keeps_float16_and_says_so():
    code, warning = compute_dtype_code("F16", "auto", bf16=False)
    assert code == "F16" and "underflow" in warning and 'dtype="float32"' in warning


@pytest.mark.parametrize("bf16", [True, False])
def test_float16_asked_for_is_kept_with_a_warning(bf16):
    code, warning = compute_dtype_code("BF16", "float16", bf16=bf16)
    assert code == "F16" and "loss scaling" in warning and ("bfloat16" if bf16 else "float32") in warning


@pytest.mark.parametrize("file,requested,expected", [("BF16", "auto", "BF16"), ("F32", "auto", "F32"),
                                                     ("F16", "float32", "F32"), ("F16", "bf16", "BF16"),
                                                     ("F32", "bfloat16", "BF16")])
def test_every_other_choice_is_silent(file, requested, expected):
    for bf16 in (True, False):
        assert compute_dtype_code(file, requested, bf16=bf16) == (expected, None)


def test_the_traits_say_which_devices_have_bf16():
    assert CPU.bf16 and CUDA.bf16  # a pre-Ampere GPU's adapter evolves it to False
    assert not attrs.evolve(CUDA, bf16=False).bf16

