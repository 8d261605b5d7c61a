"""The package's import graph: no cycles between modules' packages, the CLI only parses, and
importing the front door or the CLI does not load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tlpersona"


#: The one sanctioned upward call: a result's ``save`` asks the renderer to write it
#: (function-level, in a method named ``save``); rendering depends on results, never the reverse.
SAVE_CALLS_REPORT = {"analyses", "interventions"}


def _imports(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(imported module, enclosing function) of every runtime import (``if TYPE_CHECKING``
    blocks excluded)."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, fn: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if id(child) in skip:
                continue
            if isinstance(child, ast.ImportFrom) and child.module:
                out.append((child.module, fn))
            elif isinstance(child, ast.Import):
                out.extend((a.name, fn) for a in child.names)
            visit(child, child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                  else fn)

    visit(tree, None)
    return out


def _package_graph() -> dict[str, set[str]]:
    """Edges between top-level parts of tlpersona (``analyses``, ``cache``, ``models`` …) from
    every runtime import (``if TYPE_CHECKING`` blocks excluded), less the sanctioned ``save``
    calls into ``report``."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("").parts
        src = rel[0] if len(rel) > 1 or rel[0] != "__init__" else "tlpersona"
        for name, fn in _imports(ast.parse(path.read_text())):
            parts = name.split(".")
            if parts[0] != "tlpersona" or len(parts) < 2 or parts[1] == src:
                continue
            if parts[1] == "report" and fn == "save" and src in SAVE_CALLS_REPORT:
                continue
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
                "extraction", "operators", "files", "safety", "errors", "resultjson",
                "resultsets", "renames", "sources"):
        assert not graph.get(low, set()) & upper, (low, graph.get(low))


def test_reports_render_results_and_never_read_a_store():
    """Everything under report/ draws from the result objects it is given: no import of the
    store or of an activation source, at module level or inside a function."""
    for path in (ROOT / "report").rglob("*.py"):
        reads = [name for name, _ in _imports(ast.parse(path.read_text()))
                 if name.split(".")[:2] in (["tlpersona", "cache"], ["tlpersona", "sources"])]
        assert not reads, (path.name, reads)


def test_results_are_defined_once():
    """The front door's result names are the classes the analyses and experiments build."""
    import tlpersona as tlp
    from tlpersona.analyses.compare_result import CompareResult, PairCell
    from tlpersona.analyses.projection import ProjectionResult
    from tlpersona.analyses.subspace_result import KFound, SubspaceLayer, SubspaceResult
    from tlpersona.interventions.patching import PatchResult
    from tlpersona.interventions.steering import SteeringResult

    for cls in (CompareResult, PairCell, ProjectionResult, KFound, SubspaceLayer,
                SubspaceResult, PatchResult, SteeringResult):
        assert getattr(tlp, cls.__name__) is cls


def test_front_door_and_cli_start_without_torch():
    code = ("import sys, tlpersona, tlpersona.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(tlpersona.compare) and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
