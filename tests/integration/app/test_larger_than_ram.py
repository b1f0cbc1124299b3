"""Models larger than RAM: the file is mapped read-only, nothing on the host grows with the model.

A private, writable mapping of the weights file is charged against the machine's commit
limit byte for byte, so a file larger than RAM could not even be mapped. The process's
``RLIMIT_DATA`` counts exactly those (private, writable) bytes: a run under a data limit
smaller than the model shows that nothing per model byte is allocated or privately mapped
(``benchmarks/sparse_larger_than_ram.py`` trains a file 1.3x the machine's RAM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lema.adapters.weights.safetensors_source import SafetensorsSource
from lema.adapters.weights.model_files import resolve_model
from tests.sparse_models import write_sparse_safetensors
from tests.streamed_steps import llama_config, write_model
from tests.tolerance import assert_close, forward_floor

ROOT = Path(__file__).resolve().parents[3]
DATA_LIMIT = 256 << 20  # private writable bytes a run may add: well under the model's size


def _mappings(path: Path) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.split()[1] for line in f if line.rstrip().endswith(str(path))]


def test_weights_are_mapped_read_only_and_shared(tmp_path):
    config = llama_config(2, 256, 512, 1000, 4)
    path = write_sparse_safetensors(tmp_path / "m.safetensors", config)
    with SafetensorsSource(resolve_model(str(path)).spec, path) as source:
        weights = source.read_unit(1)
        perms = _mappings(path)
        assert perms and all(p == "r--s" for p in perms), perms  # read-only, shared: no commit charge
        assert float(weights["self_attn.q_proj.weight"].float().abs().sum()) == 0.0
    del weights


def _train(model: Path, budget: str | None, adapters: Path) -> dict:
    cmd = [sys.executable, "-m", "tests.streamed_steps", "train", "--model", str(model), "--steps", "2",
           "--data-limit", str(DATA_LIMIT), "--adapters", str(adapters)]
    if budget:
        cmd += ["--budget", budget]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_steps_in_place_and_under_a_budget_allocate_nothing_per_model_byte(tmp_path):
    """A 0.7 GB model trains 2 steps in place and under a budget in a process that may add
    only 256 MiB of private memory (a copy-on-write mapping of the file alone is refused),
    and both runs give the same adapters."""
    config = llama_config(12, 1024, 2816, 8000, 8)
    model = tmp_path / "m.safetensors"
    size = write_model(model, config, "F32")
    assert size > 2 * DATA_LIMIT
    in_place = _train(model, None, tmp_path / "a.pt")
    budget = _train(model, "160M", tmp_path / "b.pt")
    for run in (in_place, budget):
        assert run["anon_peak"] - run["anon_start"] < DATA_LIMIT
        assert run["loss"][1] < run["loss"][0]  # it trained
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    spec = resolve_model(str(model)).spec
    assert_close(b, a, floor=forward_floor(spec, 16, extra=2), what="adapters, budget vs in place")
