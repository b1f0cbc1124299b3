"""``lema plan`` on a model file larger than the RAM the run may use: the drive's line (bytes per
step, read rate, AUTO's host tier), the disk bound in the time line, ``--calibrate`` measuring the
drive on the model's own file; torch never imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lema.adapters.weights import read_rate as rr
from lema.cli import main
from tests.streamed_steps import llama_config, write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 61 MiB fp32 model, every layer dense."""
    path = tmp_path_factory.mktemp("plan-disk") / "m.safetensors"
    write_model(path, llama_config(6, 512, 1408, 2000, 4), "F32", dense=tuple(range(6)))
    return path


def _plan(model: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["plan", "--model", str(model), "--device", "cpu", "--seq", "16", *args])
    return result.exit_code, result.output


def test_a_file_larger_than_the_ram_gets_the_disk_line_and_auto_its_host_tier(model, tmp_path, monkeypatch):
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    # a named prefetch depth: AUTO's own choice of depth changes the staging beside the tier
    code, out = _plan(model, "--vram", "64M", "--ram", "120M", "--strategy", "auto", "--prefetch", "2")
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("disk: "))
    assert "AUTO holds 1 of 6 layers in host RAM" in line and "streams 6 units from disk" in line
    assert "read rate not measured: not cached; --calibrate measures it" in line
    code, out = _plan(model, "--vram", "64M", "--ram", "120M", "--strategy", "streaming")
    assert "disk: the model does not fit the page cache" in out and "holds" not in out
    code, out = _plan(model, "--vram", "64M", "--ram", "1G", "--strategy", "auto")
    assert code == 0 and "disk:" not in out  # it fits the page cache beside the run: no line


def test_a_slow_drive_makes_the_step_disk_bound_and_the_json_says_so(model, tmp_path, monkeypatch):
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    rr.store_run_rate(model, 1e6, 10 << 20, 10.0)  # 1 MB/s, as a run saw it
    code, out = _plan(model, "--vram", "64M", "--ram", "120M", "--strategy", "streaming")
    assert code == 0, out
    disk = next(x for x in out.splitlines() if x.startswith("disk: "))
    time = next(x for x in out.splitlines() if x.startswith("time: "))
    assert "cached (a run's step from disk)" in disk and "disk-bound" in disk
    assert "disk-bound" in time and ", disk " in time
    code, out = _plan(model, "--vram", "64M", "--ram", "120M", "--strategy", "auto", "--prefetch", "2", "--json")
    data = json.loads(out)
    assert data["disk"]["read_bytes_per_s"] == 1e6 and data["disk"]["held_units"] == [1]
    assert data["time"]["bound"] == "disk"
    # on the CPU the reads and the step take turns on the cores: the drive's time plus the
    # step without it (at least the compute, at most the compute and the link end to end)
    drive, t = data["disk"]["bytes_per_step"] / 1e6, data["time"]
    assert t["disk_seconds"] == pytest.approx(drive)
    assert drive + t["compute_seconds"] <= t["step_seconds"] * (1 + 1e-9)
    assert t["step_seconds"] <= (drive + t["compute_seconds"] + t["link_seconds"] + t["fixed_seconds"]) * (1 + 1e-9)


def test_calibrate_measures_the_drive_on_the_models_own_file(model, tmp_path, monkeypatch):
    monkeypatch.setenv("LEMA_CACHE", str(tmp_path / "cache"))
    code, out = _plan(model, "--vram", "64M", "--ram", "60M", "--strategy", "streaming", "--calibrate")
    assert code == 0, out
    assert "calibrated: drive" in out and str(model) in out
    disk = next(x for x in out.splitlines() if x.startswith("disk: "))
    assert "/s (measured: " in disk and ("O_DIRECT" in disk or "buffered" in disk)


def test_the_disk_line_never_imports_torch(model, tmp_path):
    env = {**os.environ, "LEMA_CACHE": str(tmp_path / "cache")}
    code = ("import sys\nfrom click.testing import CliRunner\nfrom lema.cli import main\n"
            f"r = CliRunner().invoke(main, ['plan', '--model', {str(model)!r}, '--device', 'cpu', '--seq', '16', "
            "'--vram', '64M', '--ram', '120M', '--strategy', 'auto'])\n"
            "print(r.exit_code, 'disk: AUTO holds' in r.output, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split()[-3:] == ["0", "True", "False"]
