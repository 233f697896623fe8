"""The package's import graph: no module imports another that imports it back, directly or
through others, counting function-local imports (which only hide a circle, never break it);
the write side (``autoslim.study``) never imports the read side."""

from __future__ import annotations

import ast
from pathlib import Path

import autoslim

PACKAGE = Path(autoslim.__file__).parent


def _graph() -> dict[str, set[str]]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = ["autoslim", *p.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    edges: dict[str, set[str]] = {}
    for name, p in mods.items():
        pkg = name.split(".") if p.name == "__init__.py" else name.split(".")[:-1]
        out = set()
        for node in ast.walk(ast.parse(p.read_text())):  # every import, at any depth
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[: len(pkg) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            out |= {t for t in found if t in mods and t != name}
        edges[name] = out
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_whole() -> None:
    edges = _graph()
    assert len(edges) > 40  # every module, packages included
    assert "autoslim.study.run" in edges["autoslim.workflow"]
    assert "autoslim.study.evaluation" in edges["autoslim.results.export"]  # function-local only


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert _cycles(_graph()) == []


def test_a_circle_would_be_found() -> None:
    edges = {**_graph()}
    edges["autoslim.errors"] = edges["autoslim.errors"] | {"autoslim.cli"}
    assert any("autoslim.errors" in c and "autoslim.cli" in c for c in _cycles(edges))


def test_the_write_side_never_imports_the_read_side() -> None:
    edges = _graph()
    read = ("autoslim.results", "autoslim.report", "autoslim.workflow", "autoslim.cli")
    for name, out in edges.items():
        if name.startswith("autoslim.study"):
            assert not [t for t in out if t.startswith(read)], name


def test_the_shipped_files_live_at_the_top_level() -> None:
    from autoslim.space import SPACES_DIR
    from autoslim.study.spec import STUDIES_DIR

    root = PACKAGE.parent
    if (root / "pyproject.toml").is_file():  # a source checkout (an installed wheel: inside)
        assert STUDIES_DIR == root / "studies" and SPACES_DIR == root / "search_spaces"
    assert (STUDIES_DIR / "default.toml").is_file() and (SPACES_DIR / "default.toml").is_file()
