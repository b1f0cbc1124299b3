"""The layout's rules that import-linter cannot express (docs/architecture.md, "Contracts")."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "lema"
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over lema's module import graph: every component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    modules = sorted(m for m in graph.modules if m == "lema" or m.startswith("lema."))

    def visit(root: str) -> None:
        # Iterative depth-first search (the graph is deep enough to make recursion fragile).
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if not child.startswith("lema"):
                    continue
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_among_lema_modules():
    """Every import counts: module level, inside functions and under TYPE_CHECKING (a deferred
    import that would close a circle is a circle)."""
    graph = grimp.build_graph("lema", exclude_type_checking_imports=False)
    assert _strongly_connected(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a graph with a two-module circle is reported."""
    graph = grimp.ImportGraph()
    for name in ("lema", "lema.a", "lema.b", "lema.c"):
        graph.add_module(name)
    graph.add_import(importer="lema.a", imported="lema.b")
    graph.add_import(importer="lema.b", imported="lema.a")
    graph.add_import(importer="lema.c", imported="lema.a")
    assert _strongly_connected(graph) == [["lema.a", "lema.b"]]


def test_at_most_three_modules_directly_under_lema():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "config.py", "errors.py"]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_module_is_at_most_400_lines(path: Path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


def test_every_package_init_opens_with_a_one_line_docstring():
    missing = []
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        if not doc or not doc.splitlines()[0].strip():
            missing.append(str(init.relative_to(PACKAGE.parent)))
    assert missing == []


def test_domain_never_touches_torch_cuda():
    """import-linter forbids only top-level packages; torch.cuda is checked here, by name."""
    offenders = []
    for path in sorted((PACKAGE / "domain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "cuda" and isinstance(node.value, ast.Name) \
                    and node.value.id == "torch":
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.startswith("torch.cuda") for n in names):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == []
