"""LemaConfig: every value of the wrong type or range is one ConfigError naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.config import SEED_MAX, SEED_MIN, LemaConfig
from lema.errors import ConfigError

BAD = settings.get_profile("bad-inputs")


@BAD
@given(st.sampled_from(["lora_rank", "batch_size", "max_seq_len", "gradient_accumulation_steps"]),
       st.integers(max_value=0) | st.floats() | st.text(max_size=3) | st.booleans() | st.none())
def test_a_count_that_is_not_a_positive_integer_is_named(field, value):
    with pytest.raises(ConfigError, match=rf"{field}: .* must be a positive integer"):
        LemaConfig(model_name_or_path="m", **{field: value})


@BAD
@given(st.integers(max_value=SEED_MIN - 1) | st.integers(min_value=SEED_MAX + 1) | st.floats() | st.text(max_size=3))
def test_a_seed_torch_cannot_take_is_named(seed):
    """Property: 2**70 or 1.5 is a ConfigError, never torch's overflow deep inside a run."""
    with pytest.raises(ConfigError, match="seed: "):
        LemaConfig(model_name_or_path="m", seed=seed)


@BAD
@given(st.sampled_from(["use_rslora", "gradient_checkpointing"]), st.text(max_size=3) | st.integers() | st.none())
def test_a_flag_that_is_not_a_boolean_is_named(field, value):
    with pytest.raises(ConfigError, match=rf"{field}: .* must be True(,| or) False"):  # checkpointing: or 'auto'
        LemaConfig(model_name_or_path="m", **{field: value})


def test_gradient_checkpointing_auto_is_the_default_and_named_values_stay():
    assert LemaConfig(model_name_or_path="m").gradient_checkpointing == "auto"
    assert LemaConfig(model_name_or_path="m").checkpointing is True
    assert LemaConfig(model_name_or_path="m", gradient_checkpointing=False).checkpointing is False
    with pytest.raises(ConfigError, match="needs gradient_checkpointing=True"):
        LemaConfig(model_name_or_path="m", gradient_checkpointing=False, offload_activations=True)


@BAD
@given(st.integers() | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2) | st.just([]) | st.just([""]))
def test_target_modules_that_are_not_names_are_named(value):
    with pytest.raises(ConfigError, match="lora_target_modules"):
        LemaConfig(model_name_or_path="m", lora_target_modules=value)


def test_from_dict_refuses_what_is_not_an_object():
    with pytest.raises(ConfigError, match="JSON object"):
        LemaConfig.from_dict([1, 2])
