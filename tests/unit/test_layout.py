"""The package's import graph: no cycles between modules' packages, the CLI only parses, and
importing the front door or the CLI does not load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "tlpersona"


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


#: Floors, bottom to top: a module imports from its own package or from a lower floor only.
#: Floor 0 imports nothing of tlpersona but ``errors`` and ``version``.
FLOORS = {"errors": -1, "version": -1,
          "infra": 0, "runtime": 0,  # files, locks, checks, result files | tensors and devices
          "chat": 1, "data": 1, "models": 1,  # templates and positions | inputs | GGUF, loading, layers
          "cache": 2,  # the store (manifest, ownership, writer, reader), what reads it (ActivationSource)
          "extraction": 3,  # personas × questions -> a store
          "analyses": 4,  # read-only statistics over a source
          "interventions": 5,  # experiments that run the model
          "report": 6,  # results -> markdown, figures, html; never a store, never a model
          "api": 7,  # the front door's functions
          "cli": 8, "tlpersona": 8,  # the CLI; the package's __init__ (the front door)
          "__main__": 9}


def _unit(rel: tuple[str, ...]) -> str:
    """The top-level part of tlpersona a file belongs to (``tlpersona``: the root __init__)."""
    return rel[0] if len(rel) > 1 or rel[0] != "__init__" else "tlpersona"


def _module_edges() -> list[tuple[str, str, str | None]]:
    """(importing module, imported module, enclosing function) of every runtime import between
    tlpersona's modules, less the sanctioned ``save`` calls into ``report``."""
    def name(rel: tuple[str, ...]) -> str:
        parts = rel[:-1] if rel[-1] == "__init__" else rel
        return ".".join(("tlpersona", *parts))

    modules = {name(p.relative_to(ROOT).with_suffix("").parts): p for p in ROOT.rglob("*.py")}
    edges = []
    for mod, path in modules.items():
        src = _unit(path.relative_to(ROOT).with_suffix("").parts)
        for imported, fn in _imports(ast.parse(path.read_text())):
            if not imported.startswith("tlpersona"):
                continue
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target not in modules or target == mod:
                continue
            if fn == "save" and src in SAVE_CALLS_REPORT and target.startswith("tlpersona.report"):
                continue
            edges.append((mod, target, fn))
    return edges


def test_every_top_level_part_has_a_floor():
    """A new module or package at the top level names its floor here before it lands."""
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert parts - {"__init__"} - set(FLOORS) == set()


def test_imports_run_down_the_floors():
    """Every runtime import, at module level or inside a function, goes to the module's own
    package or a lower floor; the one exception is a result's ``save`` handing itself to the
    renderer."""
    up = []
    for src, dst, fn in _module_edges():
        a, b = (_unit(tuple(m.split(".")[1:]) or ("__init__",)) for m in (src, dst))
        a, b = ("tlpersona" if m == "tlpersona" else a for m, a in ((src, a), (dst, b)))
        if a != b and FLOORS[b] >= FLOORS[a]:
            up.append(f"{src} -> {dst}" + (f" (in {fn})" if fn else ""))
    assert not up, up


def test_no_import_circles_between_modules():
    """No module reaches itself through imports, function-level ones included: a circle hidden
    behind a function-level import is still a circle."""
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _ in _module_edges():
        graph[src].add(dst)
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


def test_the_layout_rules_catch_what_they_forbid(monkeypatch, tmp_path):
    """A planted upward import and a planted circle fail the two tests above."""
    import shutil

    import pytest

    real, root = ROOT, tmp_path / "tlpersona"
    shutil.copytree(real, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", root)
    bad = root / "infra" / "files.py"
    bad.write_text(bad.read_text() + "\n\ndef _late():\n    from tlpersona.api import analysis\n")
    with pytest.raises(AssertionError, match="tlpersona.infra.files -> tlpersona.api "):
        test_imports_run_down_the_floors()
    shutil.copy(real / "infra" / "files.py", bad)
    loop = root / "infra" / "locks.py"
    loop.write_text(loop.read_text()
                    + "\n\ndef _late():\n    from tlpersona.infra.resultsets import results_set\n")
    with pytest.raises(AssertionError, match="tlpersona.infra.locks -> tlpersona.infra.resultsets"):
        test_no_import_circles_between_modules()
    (root / "stray.py").write_text("")
    with pytest.raises(AssertionError):
        test_every_top_level_part_has_a_floor()


def test_reports_render_results_and_never_read_a_store():
    """Everything under report/ draws from the result objects it is given: no import of the
    store or of an activation source, at module level or inside a function."""
    for path in (ROOT / "report").rglob("*.py"):
        reads = [name for name, _ in _imports(ast.parse(path.read_text()))
                 if name.split(".")[:2] == ["tlpersona", "cache"]]
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


def test_no_module_takes_another_modules_private_names():
    """A name that starts with ``_`` is its module's own; one that another module needs is
    public (typed and documented where it lives)."""
    found = {(path.relative_to(ROOT).as_posix(), mod, name)
             for path in ROOT.rglob("*.py") for mod, name in _private_imports(path)}
    assert found == set(), found


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
    from tlpersona.analyses.compare.result import CompareResult, PairCell
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
