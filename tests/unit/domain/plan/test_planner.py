"""The memory planner: itemised bytes, verdicts, monotonicity, recommendations, transfers."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.adapters.weights.builtin_models import builtin_config
from lema.domain.model.spec import ModelSpec
from lema.domain.plan.planner import (
    Budget,
    MemoryPlan,
    TrainingShape,
    max_resident_layers,
    plan,
)
from lema.domain.plan.strategy import MemoryStrategy
from lema.domain.schedule.layer_schedule import Fetch, OffloadInput, build_schedule
from lema.errors import ConfigError

GiB = 1024**3
TINY = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 4, "intermediate_size": 96, "vocab_size": 128, "max_position_embeddings": 4096}
SPECS = {name: ModelSpec.from_config(builtin_config(name)) for name in ("llama-2-7b", "gpt2", "qwen2.5-0.5b")}
SPECS["tiny"] = ModelSpec.from_config(TINY, dtype="F32")

specs = st.sampled_from(sorted(SPECS))
strategies = st.sampled_from(list(MemoryStrategy))


@st.composite
def shapes(draw):
    """Training shapes; offload and tiles left to the planner or fixed where they apply."""
    shape = draw(st.builds(
        TrainingShape, batch=st.integers(1, 8), seq=st.integers(1, 2048), lora_rank=st.integers(1, 64),
        strategy=strategies, prefetch=st.integers(0, 4), gradient_checkpointing=st.booleans(),
        device_kind=st.sampled_from(["cuda", "cpu"]), mode=st.sampled_from(["train", "inference"]),
    ))
    applies = shape.training and shape.gradient_checkpointing
    offload = draw(st.sampled_from([None, False, True] if applies else [None, False]))
    tile = draw(st.sampled_from([None, 0, 128, 1000] if applies else [None, 0]))
    return attrs.evolve(shape, offload_activations=offload, tile_tokens=tile)


shapes = shapes()
budgets = st.integers(64 * 1024**2, 64 * GiB)


def _all_items(p: MemoryPlan):
    return p.device_items + p.host_items


def _check_parts(item) -> None:
    if item.parts:
        combine = max if item.combine == "max" else sum
        assert item.bytes == combine(x.bytes for x in item.parts)
        for part in item.parts:
            _check_parts(part)


def _find(item, name: str):
    """Every nested part called ``name`` of an item."""
    found = [item] if item.name == name else []
    for part in item.parts:
        found += _find(part, name)
    return found


@given(specs, shapes, budgets)
def test_items_sum_to_totals_and_parts_to_items(name, shape, device):
    p = plan(SPECS[name], shape, Budget(device))
    assert p.device_total == sum(i.bytes for i in p.device_items)
    assert p.host_total == sum(i.bytes for i in p.host_items)
    d = p.to_dict()
    assert d["device"]["total_bytes"] == sum(i["bytes"] for i in d["device"]["items"])
    assert d["host"]["total_bytes"] == sum(i["bytes"] for i in d["host"]["items"])
    for item in _all_items(p):
        assert item.bytes >= 0
        _check_parts(item)
    assert p.fits == (p.device_total <= device)
    assert p.headroom_bytes == device - p.device_total


@given(specs, shapes, budgets, st.integers(1, 16 * GiB))
def test_more_vram_never_turns_fits_into_does_not_fit(name, shape, device, extra):
    small = plan(SPECS[name], shape, Budget(device))
    big = plan(SPECS[name], shape, Budget(device + extra))
    assert not small.fits or big.fits


@pytest.mark.parametrize("field, bump", [("batch", 1), ("seq", 7), ("lora_rank", 4), ("prefetch", 1)])
@settings(max_examples=25)
@given(name=specs, shape=shapes)
def test_larger_shape_never_needs_less_memory(field, bump, name, shape):
    """For fixed residency (STREAMING, RESIDENT) the device and host totals only grow."""
    if shape.strategy is MemoryStrategy.AUTO:
        shape = attrs.evolve(shape, strategy=MemoryStrategy.STREAMING)
    a = plan(SPECS[name], shape)
    b = plan(SPECS[name], attrs.evolve(shape, **{field: getattr(shape, field) + bump}))
    assert b.device_total >= a.device_total
    if not (field == "prefetch" and a.offload_activations):  # a deeper prefetch keeps one more input on the device
        assert b.host_total >= a.host_total


def _recommended(p: MemoryPlan, option: str) -> int | None:
    for text in p.recommendations:
        if f"{option} " in text and "largest" in text:
            return int(text.split(f"{option} ")[1].split()[0])
    return None


@settings(max_examples=30)
@given(specs, shapes, budgets)
def test_recommended_batch_and_seq_really_fit(name, shape, device):
    spec, budget = SPECS[name], Budget(device)
    p = plan(spec, shape, budget)
    batch, seq = _recommended(p, "--batch"), _recommended(p, "--seq")
    if batch is not None:
        assert plan(spec, attrs.evolve(shape, batch=batch), budget).fits
        if batch < 1 << 14:
            assert not plan(spec, attrs.evolve(shape, batch=batch + 1, strategy="streaming"), budget).fits
    if seq is not None:
        assert plan(spec, attrs.evolve(shape, seq=seq), budget).fits
    if not p.fits:
        assert p.fixes or any("nothing at this budget fits" in r for r in p.recommendations)
        assert "DOES NOT FIT" in p.verdict()


@given(specs, st.integers(0, 4), st.sampled_from(["train", "inference"]), st.data())
def test_transfer_bytes_match_the_layer_schedule(name, prefetch, mode, data):
    """The closed form equals the bytes of the Fetch steps of the real schedule."""
    spec = SPECS[name]
    n = spec.n_layers
    k = data.draw(st.integers(0, n + 1))
    budget = None
    shape = TrainingShape(prefetch=prefetch, mode=mode, strategy="auto" if k else "streaming")
    p = plan(spec, shape, budget)
    if k:  # force k resident units through a budget that fits exactly k
        from lema.domain.plan.assemble import _summary, build, facts_for

        f = facts_for(spec, shape)
        p = build(_summary(spec, shape, f), f, shape, None, tuple(range(1, k + 1)))
    units = list(range(1, n + 2))
    steps = build_schedule(units, prefetch, frozenset(p.resident_units), "train" if mode == "train" else "forward")
    fetched = sum(spec.units[s.unit].nbytes for s in steps if isinstance(s, Fetch))
    assert p.transfer_bytes_per_step == fetched


def test_transfer_formula_by_hand_for_llama_2_7b():
    spec = SPECS["llama-2-7b"]
    layer, head = spec.largest_layer_bytes, spec.head_unit.nbytes
    p = plan(spec, TrainingShape(prefetch=2))
    assert p.transfer_bytes_per_step == 32 * layer + head + 30 * layer
    assert plan(spec, TrainingShape(prefetch=2, mode="inference")).transfer_bytes_per_step == 32 * layer + head
    assert p.link_time_floor(1e9) == pytest.approx(p.transfer_bytes_per_step / 1e9)


def test_default_plan_items_for_llama_2_7b():
    p = plan(SPECS["llama-2-7b"], TrainingShape(), Budget.from_strings("8G"))
    assert p.slot_count == 3 and p.slot_bytes == 404_766_720
    assert p.item("weight_slots").bytes == 3 * 404_766_720
    lora = 32 * 16 * (3 * (4096 + 4096) + (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert p.model.lora_parameters == lora
    assert p.item("lora_params").bytes == 4 * lora
    assert p.item("optimizer_states").bytes == 8 * lora
    peak = p.item("activation_peak")
    phases = {x.name: x for x in peak.parts}
    assert set(phases) == {"forward", "head", "layer_backward", "optimizer_step"}
    assert peak.bytes == max(x.bytes for x in phases.values())
    assert _find(phases["head"], "checkpointed_inputs")[0].bytes == 32 * 512 * 4096 * 2
    assert _find(phases["optimizer_step"], "lora_grads")[0].bytes == 4 * lora
    assert p.item("runtime_reserve").bytes == 512 * 1024**2
    assert p.item("staging_buffers").bytes == 4 * 404_766_720  # 3 slots' worth and a spare (CUDA)
    assert p.fits and p.streamed_units == tuple(range(1, 34)) and p.resident_units == ()


def test_resident_strategy_holds_the_weights_in_host_ram():
    spec = SPECS["qwen2.5-0.5b"]  # tied: the embedding is the head's weight, counted once
    p = plan(spec, TrainingShape(strategy="resident"), Budget(8 * GiB, 2 * GiB))
    assert p.host_total == spec.weight_bytes
    assert p.item("staging_buffers").bytes == 0
    # (prefetch 1: streaming's staging ring, 2 slots' worth and a spare of the 260 MiB tied head, fits)
    tight = plan(spec, TrainingShape(strategy="resident", prefetch=1), Budget(8 * GiB, 900 * 1024**2))
    assert not tight.fits and tight.device_fits and "--strategy streaming" in tight.fixes


@pytest.mark.parametrize("strategy", ["streaming", "resident"])
def test_local_ranks_multiply_the_staging_rings_but_not_the_weights_or_the_device(strategy):
    spec = SPECS["llama-2-7b"]
    one = plan(spec, TrainingShape(strategy=strategy), Budget(24 * GiB))
    four = plan(spec, TrainingShape(strategy=strategy, local_ranks=4), Budget(24 * GiB))
    assert four.device_items == one.device_items  # per rank, with --batch per rank
    assert four.item("staging_buffers").bytes == 4 * one.item("staging_buffers").bytes
    for shared in ("resident_weights_host", "embedding"):
        assert four.item(shared).bytes == one.item(shared).bytes
    assert four.host_total - one.host_total == 3 * one.item("staging_buffers").bytes
    if strategy == "resident":
        assert "shared by 4 ranks" in four.item("resident_weights_host").note
    else:
        assert four.item("staging_buffers").note.startswith("4 ranks x 4 x")  # 3 slots and a spare


def test_auto_keeps_layers_from_the_first_upward_and_fits():
    spec = SPECS["llama-2-7b"]
    shape = TrainingShape(strategy="auto")
    p = plan(spec, shape, Budget.from_strings("8G"))
    k = max_resident_layers(spec, shape, Budget.from_strings("8G"))
    assert p.fits and 0 < k < 32
    assert p.resident_units == tuple(range(1, k + 1))
    assert not plan(spec, shape, Budget(p.device_total + 404_766_720 - 1)).resident_units[k:]
    everything = plan(spec, shape, Budget.from_strings("80G"))
    assert everything.resident_units == tuple(range(1, 34)) and everything.transfer_bytes_per_step == 0
    assert max_resident_layers(spec, shape, None) == 32


def test_70b_at_8g_does_not_fit_and_says_what_would():
    spec = ModelSpec.from_config(builtin_config("llama-2-70b"))
    p = plan(spec, TrainingShape(), Budget.from_strings("8G"))
    assert not p.fits and p.headroom_bytes < 0
    assert p.fixes == ("--prefetch 1", "--quantize nf4")
    assert p.verdict().startswith("DOES NOT FIT: needs 9.1 GiB, budget 8.0 GiB; would fit with --prefetch 1")
    assert "DOES NOT FIT" in p.explain() and "weight_slots" in p.explain()
    tiny_budget = plan(spec, TrainingShape(), Budget.from_strings("2G"))
    assert "nothing at this budget fits" in tiny_budget.recommendations[-1]


def test_math_attention_adds_the_score_matrix():
    spec = SPECS["llama-2-7b"]
    flash = _find(plan(spec, TrainingShape(seq=1024, attention="flash")).item("activation_peak"),
                  "layer_recompute")[0]
    math = _find(plan(spec, TrainingShape(seq=1024, attention="math")).item("activation_peak"),
                 "layer_recompute")[0]
    scores = {x.name: x.bytes for x in math.parts}["attention_scores"]
    assert scores == 32 * 1024 * 1024 * 2
    assert math.bytes > flash.bytes + scores
    assert TrainingShape(device_kind="cpu").attention_path == "flash"  # SDPA's fused CPU kernel
    assert TrainingShape().attention_path == "flash"


def test_inference_plans_have_no_gradients_or_optimizer():
    p = plan(SPECS["gpt2"], TrainingShape(mode="inference"))
    names: set[str] = set()
    todo = list(p.device_items)
    while todo:
        item = todo.pop()
        names.add(item.name)
        todo += item.parts
    assert not names & {"lora_grads", "optimizer_states", "checkpointed_inputs", "optimizer_step"}
    assert p.fits and p.budget is None and p.headroom_bytes is None and p.recommendations == ()


def test_dtype_override_halves_the_weights_and_is_recommended_for_fp32():
    spec = SPECS["gpt2"]
    assert plan(spec, TrainingShape(dtype="bfloat16")).slot_bytes * 2 == plan(spec).slot_bytes
    # activations dominate at batch 8 x 1024 tokens: 16-bit halves them (the computing unit's
    # cast copy eats the saving on the weights); whole layers on the device, as asked
    shape = TrainingShape(prefetch=0, device_kind="cpu", seq=1024, batch=8, offload_activations=False, tile_tokens=0)
    p = plan(spec, shape, Budget(1024 * 1024**2))
    assert not p.fits and "--dtype bfloat16" in p.fixes


def test_cpu_plans_reserve_nothing_and_the_reserve_is_configurable():
    spec = SPECS["tiny"]
    assert plan(spec, TrainingShape(device_kind="cpu")).item("runtime_reserve").bytes == 0
    assert plan(spec, TrainingShape(reserve_bytes=123)).item("runtime_reserve").bytes == 123


def test_user_targets_are_validated_and_counted():
    spec = SPECS["gpt2"]
    p = plan(spec, TrainingShape(lora_targets="c_attn,c_proj", lora_rank=8))
    # c_attn (768 -> 2304), and "c_proj" hits both attn.c_proj (768 -> 768) and mlp.c_proj (3072 -> 768)
    assert p.model.lora_parameters == 12 * 8 * ((768 + 2304) + (768 + 768) + (3072 + 768))
    with pytest.raises(ConfigError, match="match no module"):
        plan(spec, TrainingShape(lora_targets=("q_proj",)))


@pytest.mark.parametrize("kwargs, field", [
    ({"batch": 0}, "batch=0"), ({"seq": -1}, "seq=-1"), ({"lora_rank": 1.5}, "lora_rank=1.5"),
    ({"prefetch": -1}, "prefetch=-1"), ({"device_kind": "tpu"}, "device_kind='tpu'"),
    ({"attention": "fast"}, "attention='fast'"), ({"mode": "eval"}, "mode='eval'"),
    ({"strategy": "lazy"}, "strategy"), ({"dtype": "float8"}, "dtype"), ({"batch": True}, "batch=True"),
])
def test_bad_shapes_raise_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        TrainingShape(**kwargs)


def test_bad_shape_errors_are_collected_into_one():
    with pytest.raises(ConfigError) as err:
        TrainingShape(batch=0, seq=0)
    assert "batch=0" in str(err.value) and "seq=0" in str(err.value)


def test_budget_from_strings_names_the_option():
    assert Budget.from_strings("8G", "32G") == Budget(8 * GiB, 32 * GiB)
    for bad in ("0", "-1", "nan", "", "lots"):
        with pytest.raises(ConfigError, match="--vram"):
            Budget.from_strings(bad)
    with pytest.raises(ConfigError):
        Budget(0)


# -- long context: activation offload and sequence tiling (issue 14) -------------------------------


LONG = ModelSpec.from_config(builtin_config("llama-2-7b"))


def test_offloaded_inputs_wait_in_host_memory_and_cross_the_link_both_ways():
    shape = TrainingShape(seq=4096, prefetch=2, tile_tokens=0)
    on = plan(LONG, attrs.evolve(shape, offload_activations=True))
    off = plan(LONG, attrs.evolve(shape, offload_activations=False))
    x = 4096 * 4096 * 2  # one layer input: T h a
    assert on.item("offloaded_inputs").bytes == 30 * x  # 32 layers, the last 2 stay for the turn
    assert on.activation_bytes_per_step == 30 * x and off.activation_bytes_per_step == 0
    assert on.transfer_bytes_per_step == off.transfer_bytes_per_step  # the weights move as before
    assert on.link_bytes_per_step == on.transfer_bytes_per_step + 2 * 30 * x
    assert on.link_time_floor(1e9) == pytest.approx(on.link_bytes_per_step / 1e9)
    phases = {p.name: p for p in on.item("activation_peak").parts}
    assert _find(phases["head"], "checkpointed_inputs")[0].bytes == 2 * x
    # The largest phase is a layer's backward; without offload, at the first layer backward
    # (32 inputs, one layer's LoRA gradients), with it at the 30th (2 inputs, 31 layers' gradients).
    g = on.model.lora_parameters * 4 // 32
    assert off.device_total - on.device_total == 30 * x - 30 * g
    assert "offloaded_inputs" not in {i.name for i in off.host_items}


@given(specs, st.integers(0, 4), st.integers(1, 4), st.integers(16, 1024))
def test_offloaded_bytes_match_the_schedule(name, prefetch, batch, seq):
    """The plan's activation bytes are the schedule's OffloadInput steps times one layer input."""
    spec = SPECS[name]
    p = plan(spec, TrainingShape(batch=batch, seq=seq, prefetch=prefetch, offload_activations=True))
    n = spec.n_layers
    steps = build_schedule(list(range(1, n + 2)), prefetch, backward_units=frozenset(range(1, n + 1)),
                           offload_inputs=True)
    x = batch * seq * spec.hidden_size * {"F32": 4, "F16": 2, "BF16": 2}[p.model.dtype]
    assert p.activation_bytes_per_step == sum(1 for s in steps if isinstance(s, OffloadInput)) * x


@pytest.mark.parametrize("name", ["llama-2-7b", "gpt2", "tiny"])
def test_smaller_tiles_never_need_more_and_whole_layers_are_tile_zero(name):
    spec = SPECS[name]
    shape = TrainingShape(seq=2048, batch=2, offload_activations=True)
    totals = [plan(spec, attrs.evolve(shape, tile_tokens=t)).device_total for t in (0, 1024, 512, 256, 128)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]
    assert plan(spec, attrs.evolve(shape, tile_tokens=4096)).device_total == totals[0]  # a tile >= seq is whole


def test_the_planner_turns_on_offload_then_tiles_only_when_needed():
    spec = LONG
    roomy = plan(spec, TrainingShape(seq=512), Budget.from_strings("8G"))
    assert not roomy.offload_activations and roomy.tile_tokens == 0
    long = plan(spec, TrainingShape(seq=32768), Budget.from_strings("8G"))
    assert long.fits and long.offload_activations and long.tile_tokens in (4096, 8192, 16384)
    # the chosen tile is the largest that fits: the next larger one does not
    larger = plan(spec, TrainingShape(seq=32768, offload_activations=True, tile_tokens=2 * long.tile_tokens),
                  Budget.from_strings("8G"))
    assert not larger.fits
    assert any("activation offload is on" in r for r in long.recommendations)
    assert any(f"{long.tile_tokens}-position tiles" in r for r in long.recommendations)
    # offload alone is preferred to tiles when it is enough
    mid = plan(spec, TrainingShape(seq=4096), Budget(plan(spec, TrainingShape(seq=4096, offload_activations=True,
                                                                             tile_tokens=0)).device_total))
    assert mid.offload_activations and mid.tile_tokens == 0


def test_must_show_long_context_runs_fit():
    """Issue 14: llama-2-7b at 32k tokens on 8 GiB, llama-3.1-8b at 64k tokens on 24 GiB."""
    for name, vram, seq in (("llama-2-7b", "8G", 32768), ("llama-3.1-8b", "24G", 65536)):
        p = plan(ModelSpec.from_config(builtin_config(name)), TrainingShape(seq=seq), Budget.from_strings(vram))
        assert p.fits, p.explain()
        assert p.offload_activations and p.tile_tokens
        assert p.item("offloaded_inputs").bytes == 30 * seq * 4096 * 2


def test_forbidding_offload_says_it_would_fit():
    p = plan(LONG, TrainingShape(seq=32768, offload_activations=False), Budget.from_strings("8G"))
    assert not p.fits and "--offload-activations" in p.fixes
    assert "would fit with" in p.verdict() and "--offload-activations" in p.verdict()


@pytest.mark.parametrize("kwargs, field", [
    ({"offload_activations": True, "mode": "inference"}, "offload_activations=True"),
    ({"offload_activations": True, "gradient_checkpointing": False}, "offload_activations=True"),
    ({"offload_activations": "yes"}, "offload_activations='yes'"),
    ({"tile_tokens": -1}, "tile_tokens=-1"),
    ({"tile_tokens": 256, "mode": "inference"}, "tile_tokens"),
])
def test_offload_and_tiles_need_checkpointed_training(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TrainingShape(**kwargs)


def test_the_planner_tiles_only_layers_whose_tiled_working_set_it_models():
    """Routed experts (and the other newer-family terms) are not tiled by the planner itself;
    offload still applies to them."""
    from tests.family_models import config

    moe = ModelSpec.from_config({**config("mixtral").to_dict(), "num_hidden_layers": 8, "max_position_embeddings": 65536},
                                dtype="F32")
    offloaded = plan(moe, TrainingShape(seq=8192, offload_activations=True, tile_tokens=0)).device_total
    tiled = plan(moe, TrainingShape(seq=8192, offload_activations=True, tile_tokens=1024)).device_total
    assert tiled < offloaded
    p = plan(moe, TrainingShape(seq=8192), Budget(offloaded))
    assert p.fits and p.offload_activations and p.tile_tokens == 0
    assert not plan(moe, TrainingShape(seq=8192), Budget(offloaded - 1)).fits  # tiles are not tried
    forced = plan(moe, TrainingShape(seq=8192, offload_activations=True, tile_tokens=1024))
    assert forced.tile_tokens == 1024  # asked for: planned with the dense formulas
