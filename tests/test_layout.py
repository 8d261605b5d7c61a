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


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_imports(path: Path) -> set[tuple[str, str]]:
    """(module, name) of every private name one file takes from a tlpersona module: imported
    (``from tlpersona.x import _y``, or a private module) or read off an imported tlpersona
    module (``M._y``), anywhere in the file."""
    tree = ast.parse(path.read_text())
    found: set[tuple[str, str]] = set()
    modules: dict[str, str] = {}  # local name -> the tlpersona module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlpersona"):
            assert node.module is not None
            for a in node.names:
                if _private(a.name) or any(_private(p) for p in node.module.split(".")):
                    found.add((node.module, a.name))
                modules[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tlpersona"):
                    if any(_private(p) for p in a.name.split(".")):
                        found.add((a.name, ""))
                    modules[a.asname or a.name.split(".")[0]] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and _private(node.attr)):
            found.add((modules[node.value.id], node.attr))
    return found


#: Private names taken across modules before this rule: to be made public where they are
#: shared (or moved to where they are used), never added to.
KNOWN_PRIVATE_IMPORTS = {
    ("interventions/export.py", "tlpersona.cache.export", "_write_gguf"),
    ("report/patch.py", "tlpersona.report.compare", "_f"),
    ("report/subspace.py", "tlpersona.report.compare", "_f"),
}


def test_no_module_takes_another_modules_private_names():
    """A name that starts with ``_`` is its module's own; one that another module needs is
    public (typed and documented where it lives). analyses/ has no exception."""
    found = {(path.relative_to(ROOT).as_posix(), mod, name)
             for path in ROOT.rglob("*.py") for mod, name in _private_imports(path)}
    assert not {f for f in found if f[0].startswith("analyses/")}, found
    assert found - KNOWN_PRIVATE_IMPORTS == set(), "new private imports"
    assert KNOWN_PRIVATE_IMPORTS - found == set(), "fixed: drop them from KNOWN_PRIVATE_IMPORTS"


def test_private_imports_are_found_in_every_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from tlpersona.analyses.compare import _ceiling, verdict\n"
                   "from tlpersona.analyses import metrics as M\n"
                   "from tlpersona import __version__\n"
                   "def f():\n"
                   "    from tlpersona.analyses.cross_model import _matrix\n"
                   "    return M._zero_diag, M.unit, _ceiling, _matrix\n")
    assert _private_imports(src) == {
        ("tlpersona.analyses.compare", "_ceiling"), ("tlpersona.analyses.cross_model", "_matrix"),
        ("tlpersona.analyses.metrics", "_zero_diag")}


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
