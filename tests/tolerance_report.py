"""The table of docs/testing.md: what every tolerance-ruled comparison measured.

Run the suite with ``LEMA_TOLERANCE_LOG=FILE`` on each machine setting (the default kernels,
``ATEN_CPU_CAPABILITY=avx2``, ``OMP_NUM_THREADS=1``), then::

    python -m tests.tolerance_report default=a.jsonl avx2=b.jsonl one-thread=c.jsonl

prints, per test function (parameters folded together), the largest relative error, the
largest measured order noise, the rounding floor and the largest ``error / bound`` under
each setting. A ratio near 1 is a bound about to fail; the rule wants them well below.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(path: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows[row["test"].split("[")[0]].append(row)
    return rows


def main(argv: list[str]) -> None:
    settings = [arg.split("=", 1) for arg in argv]
    logs = {name: load(path) for name, path in settings}
    tests = sorted({t for rows in logs.values() for t in rows})
    head = "| test | " + " | ".join(f"{n}: error / noise / floor / worst error÷bound" for n, _ in settings) + " |"
    print(head)
    print("|---|" + "---|" * len(settings))
    for test in tests:
        cells = []
        for name, _ in settings:
            rows = logs[name].get(test, [])
            if not rows:
                cells.append("-")
                continue
            cells.append(f"{max(r['error'] for r in rows):.1e} / {max(r['noise'] for r in rows):.1e} / "
                         f"{min(r['floor'] for r in rows):.1e} / {max(r['error'] / r['bound'] for r in rows):.3f}")
        print(f"| `{test}` | " + " | ".join(cells) + " |")
    worst = max((r["error"] / r["bound"], name, r["test"]) for name, rows in logs.items()
                for group in rows.values() for r in group)
    print(f"\nworst error/bound: {worst[0]:.3f} ({worst[2]}, {worst[1]}); "
          f"comparisons: {sum(len(g) for rows in logs.values() for g in rows.values())}")


if __name__ == "__main__":
    main(sys.argv[1:])
