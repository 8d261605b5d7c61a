"""Analysis outputs and exports: a results directory never replaces a user's files, never holds
two runs, and every target is refused before the first write (issues 26, 28 and 29).

Each test tries one careless or unlucky use and checks the outcome: one error line, exit code 2,
and every file the user had byte-identical (or the new result whole and correct).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import fails as _fails
from factories import run as _run
from factories import seed_layout as _write_seed

import tlpersona as tlp
from tlpersona.api.results import results_set
from tlpersona.cache.seed_layout import check_seed_root, export_seed, read_seed
from tlpersona.errors import TlpersonaError
from tlpersona.infra.paths import RESULTS_MARK, check_persona_names

ROOT = Path(__file__).resolve().parents[2]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock's (which holds the last holder's PID)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "tlpersona.lock"}


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """A seed layout of 6 personas, 3 recipes, 2 layers (no model needed)."""
    return _write_seed(tmp_path_factory.mktemp("seed") / "seed", [f"r{i}" for i in range(6)])


@pytest.fixture(scope="module")
def cmp(seed):
    return tlp.compare(read_seed(seed), permutations=19, splits=2, null_draws=3)


def _compare_args(seed: Path, out: Path) -> list[str]:
    return ["compare", "--from-seed", str(seed), "--permutations", "19", "--splits", "2",
            "--null-draws", "3", "--out", str(out)]


# --- 1. an analysis never replaces files it did not write -------------------------------------

def test_results_never_replace_a_users_files(seed, cmp, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "report.md").write_text("my thesis, chapter 3")
    (thesis / "results.json").write_text('{"mine": true}')
    before = _snapshot(thesis)
    for overwrite in (False, True):
        with pytest.raises(TlpersonaError, match="holds files that tlpersona did not write"):
            cmp.save(thesis, overwrite=overwrite)
    _fails("holds files that tlpersona did not write there (e.g. report.md)", *_compare_args(seed, thesis))
    _fails("holds files that tlpersona did not write", "subspace", "--from-seed", str(seed),
           "--k-max", "4", "--null-draws", "3", "--out", str(thesis))
    assert _snapshot(thesis) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".thesis")]  # no partial set


def test_earlier_results_are_replaced_whole_and_only_with_overwrite(seed, cmp, tmp_path):
    out = tmp_path / "cmp"
    one_layer = tlp.compare(read_seed(seed), layers=[0], permutations=19, splits=2, null_draws=3)
    one_layer.save(out)
    assert (out / "figures" / "cosines_L0.png").exists()
    first = _snapshot(out)
    with pytest.raises(TlpersonaError, match="holds earlier compare results; give `overwrite`"):
        cmp.save(out)
    _fails("holds earlier compare results; give", *_compare_args(seed, out))
    assert _snapshot(out) == first
    report = cmp.save(out, overwrite=True)
    assert report == out / "report.md"
    # the set is the new run's alone: the one-layer run's figure went with it
    assert json.loads((out / "results.json").read_text())["layers"] == [0, 1]
    assert not (out / "figures" / "cosines_L0.png").exists()
    mark = json.loads((out / RESULTS_MARK).read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*")} - {RESULTS_MARK, "tlpersona.lock"}
    assert mark["analysis"] == "compare" and set(mark["files"]) == on_disk
    # a file a user adds to our results is theirs: refused even with overwrite
    (out / "figures" / "annotated.png").write_bytes(b"mine")
    with pytest.raises(TlpersonaError, match="figures/annotated.png, which is not part of the results"):
        cmp.save(out, overwrite=True)
    assert (out / "figures" / "annotated.png").read_bytes() == b"mine"


def test_cli_replaces_earlier_results_with_overwrite(seed, tmp_path):
    out = tmp_path / "cmp"
    assert _run(*_compare_args(seed, out))[0] == 0
    _fails("holds earlier compare results; give --overwrite", *_compare_args(seed, out))
    code, _, output = _run(*_compare_args(seed, out), "--overwrite")
    assert code == 0, output[-1500:]


def test_a_directory_holding_only_a_lock_is_empty(cmp, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "tlpersona.lock").write_text("123")  # a killed run's lock file
    assert cmp.save(out).exists()


# --- 5. a results directory never holds two runs ----------------------------------------------

_KILLED_SAVE = """
import os, signal, sys
import tlpersona as tlp
import tlpersona.report.compare as rc
from tlpersona.cache.seed_layout import read_seed

write = rc.atomic_write_bytes
def write_then_die(path, data):
    write(path, data)
    if path.name == "results.json":
        os.kill(os.getpid(), signal.SIGKILL)
rc.atomic_write_bytes = write_then_die
cmp = tlp.compare(read_seed(sys.argv[1]), layers=[1], permutations=19, splits=2, null_draws=3)
cmp.save(sys.argv[2], overwrite=True)
"""


def test_a_kill_after_results_json_leaves_the_earlier_set_whole(seed, cmp, tmp_path):
    out = tmp_path / "cmp"
    cmp.save(out)
    before = _snapshot(out)
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(seed), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _snapshot(out) == before  # the old results.json beside the old report and figures
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".cmp.tlpersona-partial-")]
    assert len(partial) == 1 and (partial[0] / "results.json").exists()
    # the next run removes what the killed one left
    cmp.save(out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cmp.")]
    assert json.loads((out / "results.json").read_text())["layers"] == cmp.layers


def test_sections_saved_into_one_set_are_swapped_in_together(seed, cmp, tmp_path):
    out = tmp_path / "exp"
    sub = tlp.subspace(read_seed(seed), k_max=4, null_draws=3)
    with results_set(out, "experiment", False) as stage:
        assert cmp.save(stage) == stage / "report.md"
        sub.save(stage)
        assert not (out / "results.json").exists()  # nothing is visible before the set is whole
    assert (out / "results.json").exists() and (out / "subspace.json").exists()
    assert json.loads((out / RESULTS_MARK).read_text())["analysis"] == "experiment"
    before = _snapshot(out)
    with pytest.raises(RuntimeError, match="a later section failed"), \
            results_set(out, "experiment", True) as stage:
        cmp.save(stage)
        raise RuntimeError("a later section failed")
    assert _snapshot(out) == before


def test_experiment_refuses_its_out_before_extracting(tmp_path):
    out = tmp_path / "exp"
    (out / "compare").mkdir(parents=True)
    (out / "compare" / "report.md").write_text("a report of mine")
    with pytest.raises(TlpersonaError, match="holds files that tlpersona did not write"):
        tlp.experiment(out, overwrite=True)
    (out / "compare" / "report.md").unlink()
    with results_set(out / "compare", "experiment", False) as stage:
        (stage / "report.md").write_text("an earlier experiment")
    with pytest.raises(TlpersonaError, match="holds earlier experiment results; give `overwrite`"):
        tlp.experiment(out)
    assert not (out / "store").exists()


# --- 12. never inside a store, however deep ----------------------------------------------------

def test_an_analysis_is_never_written_deep_inside_a_store(seed, cmp, tmp_path):
    store = tmp_path / "S"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"format": "tlpersona-store/1", "files": {}}))
    before = _snapshot(store)
    _fails("is a store's directory", *_compare_args(seed, store / "a" / "b"))
    with pytest.raises(TlpersonaError, match="is a store's directory"):
        cmp.save(store / "a" / "b" / "c")
    assert _snapshot(store) == before and not (store / "a").exists()
    # a manifest.json of another kind far above is not a store
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my web app"}')
    assert cmp.save(app / "runs" / "cmp").exists()


# --- 9. a FIFO in a seed layout is refused, not waited on --------------------------------------

@pytest.mark.parametrize("name", ["all_centroids.pt", "metadata.json", "r0__per_q.pt"])
def test_a_fifo_in_a_seed_layout_is_refused_not_waited_on(tmp_path, name):
    root = _write_seed(tmp_path / "seed", ["r0", "r1", "r2"], methods=("a",))
    if name == "r0__per_q.pt":
        for r in ("r1", "r2"):
            torch.save(torch.zeros(2, 2, 16), root / "method_a" / f"{r}__per_q.pt")
    (root / "method_a" / name).unlink(missing_ok=True)
    os.mkfifo(root / "method_a" / name)
    got: list[BaseException] = []

    def read() -> None:
        try:
            read_seed(root)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            got.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "reading the seed layout blocked on a FIFO"
    assert len(got) == 1 and isinstance(got[0], TlpersonaError)
    assert f"{name}: not a regular file" in str(got[0])


# --- 10. reserved names, ignoring case ---------------------------------------------------------

@pytest.mark.parametrize("name", ["All_Centroids", "METADATA", "pirate__PER_Q", "Pirate__Per_Q"])
def test_reserved_names_are_refused_ignoring_case(tmp_path, name):
    with pytest.raises(TlpersonaError, match="reserved for the seed layout's own files"):
        check_persona_names(["ok", name], "x")
    roles = tmp_path / "personas"
    (roles / "instructions").mkdir(parents=True)
    (roles / "role_list.json").write_text(json.dumps({"ok": "x", name: "x"}))
    for role in ("ok", name):
        (roles / "instructions" / f"{role}.json").write_text(json.dumps({"instruction": [{"pos": "Be."}]}))
    _fails("is reserved", "extract", "--personas", str(roles), "--out", str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()
    _fails("is reserved", "compare", "--from-seed", str(_write_seed(tmp_path / "seed", ["ok", name])),
           "--out", str(tmp_path / "c"))


# --- issue 28: cells by alias and negative layer; short reprs ----------------------------------

def test_cell_accepts_recipe_aliases_and_negative_layers(cmp):
    assert cmp.layers == [0, 1]  # the seed layout's layers: -1 is the last stored one
    by_name = cmp.cell(1, "last", "sys_end")
    assert cmp.cell(-1, "a", "c2") is by_name and cmp.cell(1, "c2", "a") is by_name
    assert cmp.cell(-2, "bstar", "a") is cmp.cell(0, "prompt_mean", "last")
    for layer, x, y in [(1, "a", "a"), (5, "a", "c2")]:
        with pytest.raises(KeyError):
            cmp.cell(layer, x, y)


def test_results_print_short_in_a_notebook(seed, cmp):
    text = repr(cmp)
    counts = [sum(c.verdict == v for c in cmp.cells) for v in ("PASS", "GREY", "KILL")]
    assert text.count("\n") == 1 and len(text) < 400
    assert f"{len(cmp.cells)} cells: {counts[0]} PASS, {counts[1]} GREY, {counts[2]} KILL" in text
    cell = cmp.cells[0]
    assert len(repr(cell)) < 200 and cell.verdict in repr(cell) and f"L{cell.layer}" in repr(cell)
    sub = tlp.subspace(read_seed(seed), k_max=4, null_draws=3)
    assert len(repr(sub)) < 400 and all(f"L{la.layer} k_found" in repr(sub) for la in sub.layers)
    assert len(repr(sub.layers[0])) < 120


# --- model tier: exports of a real store --------------------------------------------------------

@pytest.fixture(scope="module")
def store(loaded, tmp_path_factory):
    from tlpersona.cache.reader import open_store
    from tlpersona.chat.positions import parse_positions
    from tlpersona.data import builtin_personas, builtin_questions
    from tlpersona.extraction import ExtractConfig, extract_to_store

    cfg = ExtractConfig(parse_positions("last,sys_end"), [0, 3], batch_size=8, progress=False)
    path = extract_to_store(loaded, cfg, builtin_personas()[:3], builtin_questions()[:2],
                            tmp_path_factory.mktemp("export") / "s")
    return open_store(path)


def test_gguf_negative_layer_that_is_block_0_is_refused(store, tmp_path):
    out = tmp_path / "v.gguf"
    args = ["export", str(store.root), "--vectors", "gguf", "--persona", "pirate", "--position", "last",
            "--out", str(out)]
    assert store.manifest["n_layers_total"] == 30  # -30 is block 0
    _fails("no direction.0", *args, "--layers", "-30")
    assert not out.exists() and not list(tmp_path.iterdir())
    code, _, output = _run(*args, "--layers", "-27")  # block 3: allowed
    assert code == 0, output[-1500:]
    import gguf

    assert [t.name for t in gguf.GGUFReader(out).tensors] == ["direction.3"]


def test_a_seed_layout_is_never_written_into_a_store(store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store.root, copy)
    before = _snapshot(copy)
    for target in (copy, copy / "seed", copy / "a" / "b"):
        _fails("is a store's directory", "export", str(copy), "--seed-layout", str(target))
        with pytest.raises(TlpersonaError, match="is a store's directory"):
            export_seed(tlp.open_store(copy), target)
    assert _snapshot(copy) == before and not list(copy.glob("method_*"))
    assert _run("verify", str(copy))[0] == 0


_KILLED_EXPORT = """
import os, signal, sys
import tlpersona.cache.seed_layout as sl
from tlpersona.cache.reader import open_store

save, calls = sl.atomic_save_pt, []
def save_then_die(path, obj):
    save(path, obj)
    calls.append(path)
    if len(calls) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
sl.atomic_save_pt = save_then_die
sl.export_seed(open_store(sys.argv[1]), sys.argv[2])
"""


@pytest.mark.parametrize("after", [1, 5])  # all_centroids.pt of method_a; a file of method_c2
def test_a_killed_seed_export_is_refused_by_readers_and_can_be_rerun(store, tmp_path, after):
    seed = tmp_path / "seed"
    proc = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(store.root), str(seed), str(after)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with pytest.raises(TlpersonaError, match="did not finish; rerun the export"):
        read_seed(seed)
    code, _, output = _run("export", str(store.root), "--seed-layout", str(seed))
    assert code == 0, output[-1500:]
    back = read_seed(seed)
    assert back.positions == ["last", "sys_end"] and back.personas == store.personas
    for pos in back.positions:
        np.testing.assert_array_equal(back.centroids(pos).numpy(), store.centroids(pos).float().numpy())


def test_an_export_killed_before_its_first_file_can_be_rerun(store, tmp_path):
    mdir = tmp_path / "seed" / "method_a"
    mdir.mkdir(parents=True)
    (mdir / ".metadata.json.k3x9_a2b").write_bytes(b'{"tlpersona_se')  # the temporary file it left
    export_seed(store, tmp_path / "seed")
    assert not (mdir / ".metadata.json.k3x9_a2b").exists()
    assert read_seed(tmp_path / "seed").personas == store.personas


def test_a_foreign_seed_layout_is_found_before_anything_is_written(tmp_path):
    foreign = _write_seed(tmp_path / "theirs", ["r0", "r1"], methods=("a",))
    before = _snapshot(foreign)
    with pytest.raises(TlpersonaError, match="did not write"):
        check_seed_root(foreign)
    assert _snapshot(foreign) == before


def test_export_vectors_with_a_foreign_seed_layout_writes_nothing(store, tmp_path):
    foreign = _write_seed(tmp_path / "theirs", ["r0", "r1"], methods=("a",))
    out = tmp_path / "v.npy"
    _fails("did not write", "export", str(store.root), "--vectors", "npy", "--persona", "pirate",
           "--position", "last", "--layers", "3", "--out", str(out), "--seed-layout", str(foreign))
    assert not out.exists()
