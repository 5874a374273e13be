"""No import circles among the project's modules: every ``import`` counts (module level, in functions, under
TYPE_CHECKING), so that a definition two modules share lives in a module both depend on, not in either of them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgetune", "trainer", "tuner", "edge_server", "edge_client")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            if "_pb2" in f.name:
                continue
            name = ".".join(f.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _targets(mods: dict[str, Path], cur: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = cur.split(".")
        if mods[cur].name != "__init__.py":
            parts = parts[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name imported from a package counts as its submodule, if any)."""
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                for t in _targets(mods, m, n):
                    while t and t not in mods:
                        t = t.rpartition(".")[0]
                    if t and t != m and not m.startswith(t + "."):
                        g[m].add(t)
    return g


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    idx: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        idx[v] = low[v] = len(idx)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in idx:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(g):
            if v not in idx:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def test_the_finder_sees_a_circle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "tuner"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from tuner.b import X\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("import tuner.a\n")
    assert circles(import_graph(project_modules(tmp_path))) == [["tuner.a", "tuner.b"]]


def test_no_import_circles() -> None:
    mods = project_modules()
    assert len(mods) > 50, sorted(mods)
    found = circles(import_graph(mods))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def _imports_between(g: dict[str, set[str]], src: str, dst: str) -> list[str]:
    """Edges from modules in package ``src`` (or the module itself) to modules in package ``dst``."""

    def inside(m: str, pkg: str) -> bool:
        return m == pkg or m.startswith(pkg + ".")

    return sorted(f"{a} -> {b}" for a, targets in g.items() if inside(a, src) for b in targets if inside(b, dst))


def test_the_edge_layout_points_one_way() -> None:
    """The edge package's three parts: the server (edge_server/, runners/), the engine builder (engine/) and the
    device agent (agent/). The builder and the agent use the server's runners; the server never imports either; the
    builder never imports the agent. The tuner takes the shared device contract from the core (edgetune.device) and
    imports from the edge only the agent's timing task it sends to a device."""
    g = import_graph(project_modules())
    server = [
        m for m in g if m.startswith("edge_server") and not m.startswith(("edge_server.engine", "edge_server.agent"))
    ]
    for m in server:
        assert not [t for t in g[m] if t.startswith(("edge_server.engine", "edge_server.agent"))], (m, g[m])
    assert _imports_between(g, "edge_server.engine", "edge_server.agent") == []
    tuner_to_edge = {b for e in _imports_between(g, "tuner", "edge_server") for b in [e.split(" -> ")[1]]}
    assert tuner_to_edge <= {"edge_server.agent.timing"}, tuner_to_edge
    assert "edgetune.device" in g["tuner.device"] and "edgetune.device" in g["edge_server.agent.node"]
