"""The `lema plan` examples of docs/cli.md run as documented: same lines, same exit status."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from lema.cli import main

DOC = Path(__file__).resolve().parents[3] / "docs" / "cli.md"
TABLE = re.compile(r"[│┃━─╇┼]")


def _examples() -> list[tuple[str, list[str], int]]:
    """(command, documented output lines, exit status) for each ``$ lema plan`` block."""
    found = []
    for block in re.findall(r"```\n(\$ lema plan.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S):
        lines = block.splitlines()
        command = lines[0][2:]
        status = 0
        output = []
        for i, line in enumerate(lines[1:], start=1):
            if line == "$ echo $?":
                status = int(lines[i + 1])
                break
            output.append(line)
        found.append((command, output, status))
    return found


EXAMPLES = _examples()


def test_the_doc_has_plan_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("command,output,status", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_doc_example_runs_as_documented(command: str, output: list[str], status: int):
    result = CliRunner().invoke(main, shlex.split(command)[1:])
    assert result.exit_code == status, result.output
    got = [" ".join(line.split()) for line in result.output.splitlines()]
    for line in output:
        if line == "..." or TABLE.search(line):
            continue
        assert " ".join(line.split()) in got, f"documented line not printed: {line!r}\n{result.output}"
