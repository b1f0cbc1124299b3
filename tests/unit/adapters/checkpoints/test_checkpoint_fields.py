"""Checkpoint JSON and writes: a wrong field is one CheckpointError naming it; a failed write keeps the old one."""

from __future__ import annotations

import contextlib
import json
import resource
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.adapters.checkpoints.checkpoint_fields import check_scheduler_state, check_trainer_state
from lema.adapters.checkpoints.store import (
    TRAINER_STATE,
    load_optimizer_state,
    optimizer_to_tensors,
    read_checkpoint,
    rng_state,
    write_checkpoint,
)
from lema.domain.model.lora import LoraSpec
from lema.errors import CheckpointError

BAD = settings.get_profile("bad-inputs")
not_a_count = (st.text(max_size=4) | st.floats() | st.booleans() | st.lists(st.integers(), max_size=2)
               | st.integers(max_value=-1) | st.integers(min_value=2**63))


def _optimizer() -> torch.optim.Optimizer:
    params = [torch.zeros(3, 2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


@BAD
@given(st.sampled_from(["global_step", "micro_step"]), not_a_count)
def test_a_step_counter_that_is_not_a_count_is_named(field, value):
    state = {"global_step": 3, "micro_step": 0, "rng": rng_state(), field: value}
    with pytest.raises(CheckpointError, match=rf"trainer_state.json: {field}="):
        check_trainer_state(state, "run/trainer_state.json")


@BAD
@given(st.sampled_from(["rng", "scheduler", "config"]),
       st.text(max_size=4) | st.integers() | st.lists(st.integers(), max_size=2) | st.booleans())
def test_a_section_that_is_not_an_object_is_named(field, value):
    with pytest.raises(CheckpointError, match=rf"{field}=.* must be a JSON object"):
        check_trainer_state({"global_step": 1, field: value}, "trainer_state.json")


@BAD
@given(st.data())
def test_a_scheduler_state_unlike_the_schedulers_own_is_refused(data):
    """Property: an unknown field, or a known one holding another kind of value, is a CheckpointError."""
    fresh = torch.optim.lr_scheduler.LambdaLR(_optimizer(), lambda step: 1.0).state_dict()
    if data.draw(st.booleans(), label="unknown field"):
        extra = data.draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in fresh))
        saved, pattern = {**fresh, extra: 1}, "unknown fields"
    else:
        key = data.draw(st.sampled_from(sorted(k for k, v in fresh.items() if v is not None and k != "lr_lambdas")))
        wrong = data.draw(st.text(max_size=3) | st.lists(st.text(max_size=2), min_size=3, max_size=4)
                          | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
        saved, pattern = {**fresh, key: wrong}, rf"{key}="
    with pytest.raises(CheckpointError, match=pattern):
        check_scheduler_state(saved, fresh, "trainer_state.json")


@BAD
@given(st.sampled_from(["r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules"]), st.data())
def test_an_adapter_config_field_of_the_wrong_type_is_named(field, data):
    wrong = {"r": st.text(max_size=3) | st.floats() | st.integers(max_value=0) | st.integers(min_value=65_537),
             "lora_alpha": st.text(min_size=1, max_size=3) | st.floats(max_value=0) | st.just(float("nan")),
             "lora_dropout": st.text(min_size=1, max_size=3) | st.floats(min_value=1.0) | st.floats(max_value=-0.01),
             "use_rslora": st.text(min_size=1, max_size=3) | st.integers(min_value=1),
             "target_modules": st.integers() | st.dictionaries(st.text(max_size=2), st.integers(), min_size=1)}[field]
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: data.draw(wrong)}
    name = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}.get(field, field)
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: .*{name}"):
        LoraSpec.from_adapter_config(config)


@BAD
@given(st.sampled_from(["param_names", "state", "param_groups"]),
       st.text(max_size=3) | st.integers() | st.lists(st.integers(), min_size=1, max_size=2))
def test_malformed_optimizer_metadata_is_a_checkpoint_error(field, value):
    opt = _optimizer()
    tensors, meta = optimizer_to_tensors(opt, ["a", "b"])
    with pytest.raises(CheckpointError, match=field):
        load_optimizer_state(_optimizer(), tensors, {**meta, field: value})


def test_optimizer_state_of_another_shape_is_refused():
    tensors, meta = optimizer_to_tensors(_optimizer(), ["a", "b"])
    tensors = {k: (torch.zeros(5) if k.endswith("exp_avg") and ".a." in k else v) for k, v in tensors.items()}
    with pytest.raises(CheckpointError, match=r"optimizer state a.exp_avg has shape \[5\]"):
        load_optimizer_state(_optimizer(), tensors, meta)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG, as on a full disk (SIGXFSZ ignored meanwhile)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_write_that_runs_out_of_space_is_one_error_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    write_checkpoint(path, adapter_tensors={"a": torch.zeros(4)}, adapter_config={"r": 1},
                     trainer_state={"global_step": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with file_size_limit(4096), pytest.raises(CheckpointError, match="could not write the checkpoint .*File too large"):
        write_checkpoint(path, adapter_tensors={"a": torch.zeros(100_000)}, adapter_config={"r": 1},
                         trainer_state={"global_step": 2})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left


def test_a_corrupt_trainer_state_is_named_when_the_checkpoint_is_read(tmp_path):
    write_checkpoint(tmp_path / "c", adapter_tensors={"a": torch.zeros(1)}, adapter_config={"r": 1},
                     trainer_state={"global_step": 1})
    (tmp_path / "c" / TRAINER_STATE).write_text(json.dumps({"global_step": "1"}))
    with pytest.raises(CheckpointError, match="global_step='1' must be an integer"):
        read_checkpoint(tmp_path / "c")
