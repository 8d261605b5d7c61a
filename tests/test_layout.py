"""The package's import graph: no cycles between modules' packages, the CLI only parses, and
importing the front door or the CLI does not load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tlpersona"


def _package_graph() -> dict[str, set[str]]:
    """Edges between top-level parts of tlpersona (``analyses``, ``cache``, ``models`` …) from
    every runtime import (``if TYPE_CHECKING`` blocks excluded)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("").parts
        src = rel[0] if len(rel) > 1 or rel[0] != "__init__" else "tlpersona"
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "tlpersona" and len(parts) > 1 and parts[1] != src:
                    graph[src].add(parts[1])
    return graph


def test_no_import_cycles_between_packages():
    graph = _package_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_lower_layers_never_import_upper_ones():
    graph = _package_graph()
    upper = {"api", "cli", "report", "interventions", "analyses"}
    for low in ("conversation", "positions", "data", "cache", "models", "decode", "generation",
                "extraction", "operators", "files", "safety", "errors"):
        assert not graph.get(low, set()) & upper, (low, graph.get(low))


def test_front_door_and_cli_start_without_torch():
    code = ("import sys, tlpersona, tlpersona.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(tlpersona.compare) and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
