"""Checkpoint directories: PEFT adapter + optimizer + trainer state, atomic and pickle-free."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lema.adapters.checkpoints.atomic import (
    atomic_directory,
    atomic_write_text,
    backup_path,
)
from lema.adapters.checkpoints.store import (
    load_optimizer_state,
    optimizer_to_tensors,
    read_adapter,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from lema.errors import CheckpointError

KEY = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"


def adapter(value: float = 0.0, layers: int = 2, size: int = 8) -> dict[str, torch.Tensor]:
    return {KEY.format(i, ab): torch.full((4, size) if ab == "A" else (size, 4), value)
            for i in range(layers) for ab in "AB"}


CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}


def make_params() -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.{ab}": torch.nn.Parameter(torch.randn(3, 5, generator=g)) for i in range(2) for ab in "AB"}


def adamw_steps(params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_round_trip_of_every_file(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": {}}')
    params = make_params()
    opt = torch.optim.AdamW(params.values(), lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    adamw_steps(params, opt, 2, seed=1)
    opt_tensors, opt_meta = optimizer_to_tensors(opt, list(params))
    state = {"step": 2, "rng": rng_state(), "config": {"lr": 1e-3}}
    tensors = adapter(0.5)
    write_checkpoint(tmp_path / "ck", adapter_tensors=tensors, adapter_config=CONFIG, optimizer_tensors=opt_tensors,
                     optimizer_meta=opt_meta, trainer_state=state, tokenizer_dir=tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "ck")) == ["adapter_config.json", "adapter_model.safetensors",
                                                   "optimizer.safetensors", "tokenizer.json", "trainer_state.json"]
    ck = read_checkpoint(tmp_path / "ck")
    assert ck.adapter_config == CONFIG
    assert ck.adapter_tensors.keys() == tensors.keys()
    assert all(torch.equal(ck.adapter_tensors[k], v) for k, v in tensors.items())
    assert ck.trainer_state == json.loads(json.dumps(state))
    assert ck.optimizer_meta == json.loads(json.dumps(opt_meta))
    assert all(torch.equal(ck.optimizer_tensors[k], v) and ck.optimizer_tensors[k].dtype == v.dtype
               for k, v in opt_tensors.items())
    assert read_adapter(tmp_path / "ck")[0] == CONFIG
    # A checkpoint with only the adapter reads back with None for the rest.
    write_checkpoint(tmp_path / "bare", adapter_tensors=tensors, adapter_config={"r": 4, "lora_alpha": 8})
    bare = read_checkpoint(tmp_path / "bare")
    assert bare.optimizer_tensors is None and bare.trainer_state is None and bare.adapter_config["peft_type"] == "LORA"


def test_adamw_state_round_trip_is_bit_exact(tmp_path):
    """Resuming from the files continues exactly as the uninterrupted optimizer."""
    params = make_params()
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.01)
    adamw_steps(params, opt, 3, seed=1)
    tensors, meta = optimizer_to_tensors(opt, list(params))
    write_checkpoint(tmp_path / "ck", adapter_tensors=adapter(), adapter_config=CONFIG,
                     optimizer_tensors=tensors, optimizer_meta=meta)
    ck = read_checkpoint(tmp_path / "ck")
    resumed = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
    opt2 = torch.optim.AdamW(resumed.values(), lr=0.5)  # hyperparameters come from the checkpoint
    load_optimizer_state(opt2, ck.optimizer_tensors, ck.optimizer_meta)
    before, after = opt.state_dict(), opt2.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        for key, value in st.items():
            assert after["state"][i][key].dtype == value.dtype
            assert torch.equal(after["state"][i][key], value), (i, key)
    adamw_steps(params, opt, 2, seed=7)
    adamw_steps(resumed, opt2, 2, seed=7)
    for name in params:
        assert torch.equal(params[name], resumed[name]), name


def test_optimizer_state_for_other_parameters_is_refused():
    params = make_params()
    opt = torch.optim.AdamW(params.values())
    adamw_steps(params, opt, 1, seed=0)
    tensors, meta = optimizer_to_tensors(opt, list(params))
    fewer = torch.optim.AdamW(list(params.values())[:2])
    with pytest.raises(CheckpointError, match="parameter groups"):
        load_optimizer_state(fewer, tensors, meta)
    with pytest.raises(CheckpointError, match="is for AdamW"):
        load_optimizer_state(torch.optim.SGD(params.values(), lr=0.1), tensors, meta)


def test_rng_state_round_trip_through_json():
    torch.manual_seed(3)
    random.seed(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(5), random.random())
    torch.manual_seed(99)
    random.seed(99)
    set_rng_state(state)
    got = (torch.rand(5), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def _corrupt(kind: str, ck: Path) -> None:
    if kind == "missing adapter_model.safetensors":
        (ck / "adapter_model.safetensors").unlink()
    elif kind == "missing adapter_config.json":
        (ck / "adapter_config.json").unlink()
    elif kind == "truncated adapter":
        data = (ck / "adapter_model.safetensors").read_bytes()
        (ck / "adapter_model.safetensors").write_bytes(data[: len(data) - 40])
    elif kind == "truncated header":
        (ck / "adapter_model.safetensors").write_bytes(b"\x00\x10")
    elif kind == "garbage optimizer":
        (ck / "optimizer.safetensors").write_bytes(b"not safetensors at all, really")
    elif kind == "bad trainer_state JSON":
        (ck / "trainer_state.json").write_text('{"step": 3,')
    elif kind == "bad adapter_config JSON":
        (ck / "adapter_config.json").write_text("[1, 2")
    elif kind == "not LoRA":
        (ck / "adapter_config.json").write_text(json.dumps({**CONFIG, "peft_type": "IA3"}))
    elif kind == "no directory":
        import shutil

        shutil.rmtree(ck)


@pytest.mark.parametrize("kind", ["missing adapter_model.safetensors", "missing adapter_config.json",
                                  "truncated adapter", "truncated header", "garbage optimizer",
                                  "bad trainer_state JSON", "bad adapter_config JSON", "not LoRA", "no directory"])
def test_damaged_checkpoints_raise_checkpoint_error(tmp_path, kind):
    params = make_params()
    opt = torch.optim.AdamW(params.values())
    adamw_steps(params, opt, 1, seed=0)
    tensors, meta = optimizer_to_tensors(opt, list(params))
    write_checkpoint(tmp_path / "ck", adapter_tensors=adapter(1.0), adapter_config=CONFIG,
                     optimizer_tensors=tensors, optimizer_meta=meta, trainer_state={"step": 1})
    _corrupt(kind, tmp_path / "ck")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "ck")


def test_interrupted_swap_is_recovered_on_next_open(tmp_path):
    """A kill between 'old -> backup' and 'new -> path' leaves the backup, which is restored."""
    write_checkpoint(tmp_path / "ck", adapter_tensors=adapter(1.0), adapter_config=CONFIG)
    os.replace(tmp_path / "ck", backup_path(tmp_path / "ck"))
    ck = read_checkpoint(tmp_path / "ck")
    assert torch.equal(ck.adapter_tensors[KEY.format(0, "A")], torch.full((4, 8), 1.0))
    assert (tmp_path / "ck").is_dir() and not backup_path(tmp_path / "ck").exists()


def test_failed_write_leaves_the_old_directory_and_no_temporaries(tmp_path):
    write_checkpoint(tmp_path / "ck", adapter_tensors=adapter(1.0), adapter_config=CONFIG)
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "ck") as tmp:
            (tmp / "adapter_config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ["ck"]
    assert read_checkpoint(tmp_path / "ck").adapter_config == CONFIG
    atomic_write_text(tmp_path / "note.txt", "hello")
    assert (tmp_path / "note.txt").read_text() == "hello"


CHILD = textwrap.dedent("""
    import sys, torch
    from lema.adapters.checkpoints.store import write_checkpoint
    path, size = sys.argv[1], int(sys.argv[2])
    version = 2
    while True:
        tensors = {f"base_model.model.layer{i}.q_proj.lora_{ab}.weight": torch.full((size,), float(version))
                   for i in range(4) for ab in "AB"}
        print("writing", flush=True)
        write_checkpoint(path, adapter_tensors=tensors, adapter_config={"r": 4, "lora_alpha": 8, "version": version},
                         trainer_state={"version": version})
        version += 1
""")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.6])
def test_sigkill_during_write_leaves_a_loadable_checkpoint(tmp_path, delay):
    """Killed at any moment, the directory holds one complete version (old or new)."""
    ck = tmp_path / "ck"
    write_checkpoint(ck, adapter_tensors={"base_model.model.layer0.q_proj.lora_A.weight": torch.ones(3)},
                     adapter_config={"r": 4, "lora_alpha": 8, "version": 1}, trainer_state={"version": 1})
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ck), str(2_000_000)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    result = read_checkpoint(ck)
    version = result.adapter_config["version"]
    assert result.trainer_state == {"version": version}
    for tensor in result.adapter_tensors.values():
        assert torch.all(tensor == (1.0 if version == 1 else float(version)))
    if version > 1:
        assert len(result.adapter_tensors) == 8


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    from lema.adapters.checkpoints.atomic import clean_stale_temps

    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f".ck.tmp-{dead}-abc").mkdir()
    (tmp_path / f".ck.tmp-{dead}-abc" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / f".model.safetensors.tmp-{dead}-x1").write_bytes(b"half")
    (tmp_path / ".old.tmp-k2j3h4g5").mkdir()  # an older version's name, without a pid
    (tmp_path / f".ck.tmp-{live}-def").mkdir()
    (tmp_path / "ck.tmp-1-abc").write_text("not ours: no leading dot")
    assert {p.name for p in clean_stale_temps(tmp_path, "model.safetensors")} == {f".model.safetensors.tmp-{dead}-x1"}
    assert {p.name for p in clean_stale_temps(tmp_path)} == {f".ck.tmp-{dead}-abc", ".old.tmp-k2j3h4g5"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".ck.tmp-{live}-def", "ck.tmp-1-abc"]


def test_a_run_lock_is_exclusive_and_released(tmp_path):
    from lema.adapters.checkpoints.run_lock import LOCK_NAME, acquire_run_lock
    from lema.errors import RunInUseError

    lock, note = acquire_run_lock(tmp_path / "run")
    assert note is None and (tmp_path / "run" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with pytest.raises(RunInUseError, match=f"process {os.getpid()}"):
        acquire_run_lock(tmp_path / "run")  # a second holder, even in this process
    lock.release()
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with acquire_run_lock(tmp_path / "run")[0] as again:
        assert again.held
    assert not again.held
