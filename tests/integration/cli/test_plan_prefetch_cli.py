"""`lema plan --strategy auto` chooses the prefetch depth and says so, in text and JSON;
`--prefetch N` is kept; the plan stays torch-free (issue 27)."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from lema.cli import main

ARGS = ["plan", "--model", "llama-2-7b", "--vram", "8G", "--device", "cuda"]

SCRIPT = """
import json, sys
from click.testing import CliRunner
from lema.cli import main
r = CliRunner().invoke(main, {args!r})
print(json.dumps({{"code": r.exit_code, "torch": "torch" in sys.modules, "out": r.stdout}}))
"""


def test_auto_chooses_the_depth_in_json_without_importing_torch(tmp_path):
    args = ARGS + ["--strategy", "auto", "--json"]
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(args=args)], capture_output=True, text=True,
                          check=True, env={"LEMA_CACHE": str(tmp_path), "PATH": "", "HOME": str(tmp_path)})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["torch"] is False
    data = json.loads(result["out"])
    depth = data["shape"]["prefetch"]
    line = next(c for c in data["choices"] if c.startswith("prefetch "))
    assert line.startswith(f"prefetch {depth} (") and "other depths" in line
    assert data["slot_count"] == depth + 1
    assert 0 < data["time"]["fixed_seconds"] < data["time"]["step_seconds"]


def test_a_named_prefetch_is_kept_and_another_strategy_reads_two_ahead():
    named = CliRunner().invoke(main, ARGS + ["--strategy", "auto", "--prefetch", "3"])
    assert named.exit_code == 0, named.output
    assert "auto, prefetch 3," in named.output and "chose: prefetch" not in named.output
    streaming = CliRunner().invoke(main, ARGS)
    assert "streaming, prefetch 2," in streaming.output and "chose: prefetch" not in streaming.output
