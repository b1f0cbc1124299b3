"""Every command refuses every bad input of the corpus with one line, exit 2, in bounded RAM and time.

The corpus (tests/bad_input_corpus.py) holds malformed safetensors headers, config.json
files, shard indexes, training data and checkpoints (over 100 files), plus bad options of
every command. All of them run in one fresh process (tests/bad_input_runner.py), so the
torch import is paid once and the process's peak RSS covers only LEMA's work.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_input_corpus import KINDS, build_corpus, corpus_files

REPO = Path(__file__).resolve().parents[3]
MAX_RSS = 1 << 30  # bytes
MAX_SECONDS = 10.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


def test_the_corpus_has_over_100_bad_files_of_every_kind(corpus):
    root, cases = corpus
    files = corpus_files(cases)
    assert len(files) >= 100
    assert all((root / f).exists() for f in files)
    for kind in ("header", "config", "index", "data", "checkpoint"):
        assert sum(1 for c in cases if c.kind == kind) >= 8, kind
    assert sum(1 for c in cases if c.kind == "hostile") >= 60  # the second campaign (issue 25)
    commands = {argv[0] for c in cases for argv in c.commands}
    assert commands == {"plan", "convert", "train", "generate", "merge", "bench", "demo", "frobnicate"}


@pytest.fixture(scope="module")
def results(corpus, tmp_path_factory) -> list[dict]:
    root, cases = corpus
    cases_file = tmp_path_factory.mktemp("cases") / "cases.json"
    cases_file.write_text(json.dumps([c.to_json() for c in cases]), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LEMA_CACHE": str(root / "cache"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tests.bad_input_runner", str(root), str(cases_file)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _problems(result: dict) -> list[str]:
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    problems = []
    if result["escaped"]:
        problems.append("an exception escaped:\n" + result["escaped"][-1500:])
    if result["exit_code"] != 2:
        problems.append(f"exit {result['exit_code']}")
    if len(errors) != 1 or len(lines) != 1:
        problems.append(f"stderr is not one Error: line: {result['stderr'][-800:]!r}")
    elif not re.search(result["expect"], errors[0], re.IGNORECASE):
        problems.append(f"the error does not match {result['expect']!r}: {errors[0]}")
    if "Traceback" in result["stdout"] + result["stderr"]:
        problems.append("a traceback was printed")
    if result["seconds"] > MAX_SECONDS:
        problems.append(f"took {result['seconds']:.1f} s")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_command_refuses_each_bad_input_with_one_error_line(corpus, results, kind):
    _, cases = corpus
    mine = [r for r in results if r["kind"] == kind]
    assert len(mine) == sum(len(c.commands) for c in cases if c.kind == kind)
    failures = [f"{r['kind']}/{r['name']}: lema {' '.join(r['argv'][:3])} ...: {'; '.join(p)}"
                for r in mine for p in [_problems(r)] if p]
    assert failures == [], "\n".join(failures)
    # VmHWM is the process's high-water mark: below the bound after a command, below it during.
    peak = max(r["maxrss_bytes"] for r in mine)
    assert peak < MAX_RSS, f"peak RSS {peak / 2**20:.0f} MiB"
