"""The three axes stay in their rooms: no family name tested outside the families, no device
probed or named outside its adapter (docs/architecture.md, "Three things vary")."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "lema"

FAMILY_TEST = re.compile(r"""family\s*(==|!=)\s*["']|["']\w+["']\s*(==|!=)\s*\w*\.?family\b""")
DEVICE_PROBE = re.compile(r"getattr\(\s*(self\.)?(device|dev|model\.device)\b")
DEVICE_KIND_TEST = re.compile(r"""(device_kind|torch_device\.type|traits\.kind|device\.type)\s*(==|!=)\s*["']""")


def _lines(*folders: str) -> list[tuple[str, int, str]]:
    out = []
    for folder in folders:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                out.append((f"{path.relative_to(PACKAGE.parent)}:{number}", number, line))
    return out


def test_no_family_name_is_tested_outside_the_families():
    folders = [p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"]
    offenders = [where for where, _, line in _lines(*folders) if FAMILY_TEST.search(line)
                 and "/domain/families/" not in where]
    assert offenders == []


def test_the_runtime_and_the_planner_read_device_traits_instead_of_probing_or_naming_devices():
    lines = _lines("app", "domain/plan")
    offenders = [where for where, _, line in lines if DEVICE_PROBE.search(line) or DEVICE_KIND_TEST.search(line)]
    assert offenders == []
