"""The shape of the house: no import cycle among gendd's modules (imports inside functions included), one
training loop in the evaluation stage, no dispatch on protocol classes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _import_graph() -> dict[str, set[str]]:
    mods = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gendd"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[m].add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name.startswith("gendd"))
    return {m: {t for t in ts if t in mods and t != m} for m, ts in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_gendd_modules():
    graph = _import_graph()
    assert "gendd.evaluate.fit" in graph and graph["gendd.evaluate.recipes"]
    assert _cycles(graph) == []


def test_one_loop_steps_an_optimiser_in_the_evaluation_stage():
    steps = [(f.name, i) for f in (SRC / "gendd" / "evaluate").glob("*.py")
             for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(r"\bopt\w*\.step\(\)", line)]
    assert [name for name, _ in steps] == ["fit.py"], steps


def test_no_dispatch_on_protocol_classes():
    hits = [str(f) for f in SRC.rglob("*.py") if "isinstance(protocol" in f.read_text()]
    assert hits == []
