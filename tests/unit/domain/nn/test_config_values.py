"""config.json fields: every wrong type, sign or size is one ModelFormatError naming the field."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.domain.nn.config_values import ACTIVATIONS, MAX_LAYERS
from lema.domain.model.spec import ModelSpec
from lema.domain.plan.planner import Budget, TrainingShape, plan
from lema.errors import ModelFormatError

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 256}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64}
LLAMA_INTS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
              "vocab_size", "max_position_embeddings", "head_dim", "sliding_window")
GPT2_INTS = ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions", "n_inner")
BOOLEANS = ("tie_word_embeddings", "attention_bias", "use_sliding_window")
BAD = settings.get_profile("bad-inputs")

# Values that are not positive integers: strings, floats, lists, objects, booleans, <= 0.
not_positive_int = (st.text(max_size=5) | st.floats() | st.lists(st.integers(), max_size=2)
                    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1) | st.booleans()
                    | st.integers(max_value=0))


@BAD
@given(st.sampled_from(LLAMA_INTS), not_positive_int)
def test_a_llama_size_that_is_not_a_positive_integer_is_named(field, value):
    """Property: ModelFormatError naming the field, whatever the wrong value."""
    with pytest.raises(ModelFormatError, match=rf"config\.json: .*{field}="):
        ModelSpec.from_config({**LLAMA, field: value})


@BAD
@given(st.sampled_from(GPT2_INTS), not_positive_int)
def test_a_gpt2_size_that_is_not_a_positive_integer_is_named(field, value):
    with pytest.raises(ModelFormatError, match=rf"config\.json: .*{field}="):
        ModelSpec.from_config({**GPT2, field: value})


@BAD
@given(st.sampled_from(["num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                        "max_position_embeddings"]), st.integers(min_value=(1 << 24) + 1, max_value=1 << 200))
def test_a_size_beyond_the_bounds_is_refused_in_well_under_a_second(field, value):
    """Property: an absurd size is refused by name before anything proportional to it is built."""
    began = time.perf_counter()
    with pytest.raises(ModelFormatError, match=rf"{field}={str(value)[:30]}.* is more than LEMA plans"):
        ModelSpec.from_config({**LLAMA, field: value})
    assert time.perf_counter() - began < 0.5


@BAD
@given(st.sampled_from(BOOLEANS), st.text(max_size=5) | st.integers() | st.lists(st.booleans(), max_size=2))
def test_a_flag_that_is_not_a_boolean_is_named(field, value):
    """Property: "false" (a string) or 0 is not a boolean: ModelFormatError naming the field."""
    with pytest.raises(ModelFormatError, match=rf"{field}=.* must be true or false"):
        ModelSpec.from_config({**LLAMA, field: value})


@BAD
@given(st.sampled_from(["rms_norm_eps", "rope_theta"]),
       st.text(max_size=4) | st.floats(max_value=0) | st.just(float("nan")) | st.just(float("inf")) | st.booleans())
def test_an_epsilon_or_theta_that_is_not_a_finite_positive_number_is_named(field, value):
    with pytest.raises(ModelFormatError, match=rf"{field}=.* must be a finite number > 0"):
        ModelSpec.from_config({**LLAMA, field: value})


@BAD
@given(st.integers(1, 64), st.integers(1, 64))
def test_heads_that_do_not_divide_are_named_else_the_spec_builds(heads, kv_heads):
    """Property: inconsistent head counts are one ModelFormatError; consistent ones build a spec."""
    config = {**LLAMA, "hidden_size": 64 * heads, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    if heads % kv_heads:
        with pytest.raises(ModelFormatError, match="not a multiple of num_key_value_heads"):
            ModelSpec.from_config(config)
    else:
        assert ModelSpec.from_config(config).n_kv_heads == kv_heads


@settings(BAD, max_examples=min(BAD.max_examples, 6))
@given(st.integers(1, MAX_LAYERS))
def test_any_layer_count_within_the_bound_plans_quickly(layers):
    """Property: a plan (AUTO, with a budget, recommendations included) stays fast up to the bound."""
    spec = ModelSpec.from_config({**LLAMA, "num_hidden_layers": layers})
    began = time.perf_counter()
    result = plan(spec, TrainingShape(strategy="auto"), Budget(8 << 30))
    assert result.fits and time.perf_counter() - began < 2.0


def test_every_problem_of_a_config_is_named_in_one_error():
    with pytest.raises(ModelFormatError) as info:
        ModelSpec.from_config({**LLAMA, "hidden_size": "64", "vocab_size": -1, "tie_word_embeddings": "no"})
    message = str(info.value)
    assert "hidden_size='64'" in message and "vocab_size=-1" in message and "tie_word_embeddings='no'" in message


def test_the_checked_activations_are_the_implemented_ones():
    from lema.domain.nn import norms, options

    assert set(ACTIVATIONS) == set(norms.ACTIVATIONS) == set(options.ACTIVATIONS)


def test_an_int_dtype_config_is_refused():
    with pytest.raises(ModelFormatError, match="torch_dtype='int8' is not a floating-point dtype"):
        ModelSpec.from_config({**LLAMA, "torch_dtype": "int8"})
