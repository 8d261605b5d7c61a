"""A store's own faults on synthetic stores: NaN/inf in stored tensors, position files swapped
with their manifest entries, a store object whose directory is replaced under it, parts left by
a run with other settings, and float16 overflow at write time."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tlpersona.cache import StoreWriter, open_store, verify_store
from tlpersona.cache.export import VectorExport, export_vectors
from tlpersona.cache.manifest import _first_nonfinite
from tlpersona.cache.reader import Store, check_store
from tlpersona.cache.writer import check_parts
from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import sha256_file

POSITIONS = ["last", "prompt_mean", "sys_end"]
PER_QUESTION = ["last", "prompt_mean"]
N_P, N_Q, LAYERS, D = 12, 3, [1, 3], 4
PROV = {"personas": [f"p{i}" for i in range(N_P)], "questions": [f"q{j}" for j in range(N_Q)],
        "layers": LAYERS, "positions": POSITIONS, "prompt_index": 0, "responses_hash": None}


def _persona(i: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + i)
    t = {"sys_end/centroid": torch.randn(len(LAYERS), D, generator=g)}
    for pos in PER_QUESTION:
        per_q = torch.randn(N_Q, len(LAYERS), D, generator=g)
        t[f"{pos}/centroid"] = per_q.mean(0)
        t[f"{pos}/per_question"] = per_q.half()
        t[f"{pos}/valid"] = torch.ones(N_Q, dtype=torch.uint8)
    return t


def _make(root: Path, prov: dict = PROV, seed: int = 0, force_new: bool = False) -> Path:
    w = StoreWriter(root, prov, {"d_model": D}, force_new=force_new)
    for i in range(len(prov["personas"])):
        w.write_part(i, _persona(i, seed))
    w.finalize()
    return root


def _rehash(root: Path) -> None:
    """Make the manifest's checksums match the files again (what a careless edit would do)."""
    m = json.loads((root / "manifest.json").read_text())
    for name in m["files"]:
        m["files"][name]["sha256"] = sha256_file(root / name)
    (root / "manifest.json").write_text(json.dumps(m))


def _rewrite(root: Path, pos: str, edit=None, meta: dict | None | str = "keep",
             rehash: bool = True) -> None:
    """Rewrite one position file with its tensors edited in place (and the manifest rehashed)."""
    path = root / f"{pos}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        own = f.metadata()
    if edit:
        edit(tensors)
    save_file(tensors, str(path), metadata=own if meta == "keep" else meta)
    if rehash:
        _rehash(root)


def _set(key: str, index: tuple, value: float):
    def edit(t):
        t[key][index] = value
    return edit


@pytest.fixture
def store(tmp_path) -> Path:
    return _make(tmp_path / "s")


# NaN and inf in a store (sha256 updated to match) ------------------------------------------


def test_first_nonfinite_matches_numpy():
    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.float32):
        for bad in (np.nan, np.inf, -np.inf):
            a = rng.standard_normal((5, 7, 3, 11)).astype(dtype)
            spots = [tuple(rng.integers(0, s) for s in a.shape) for _ in range(3)]
            for s in spots:
                a[s] = bad
            want = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
            index, value = _first_nonfinite(torch.from_numpy(a))
            assert index == want
            assert (np.isnan(value) and np.isnan(bad)) or value == bad
        assert _first_nonfinite(torch.from_numpy(rng.standard_normal((4, 5)).astype(dtype))) is None
    # float16's largest values do not overflow the float32 sum the fast check uses
    assert _first_nonfinite(torch.full((1 << 20,), 65504.0, dtype=torch.float16)) is None


def test_nan_centroid_is_named_by_verify_and_refused_by_readers(store, tmp_path):
    _rewrite(store, "sys_end", _set("centroids", (4, 1, 2), float("nan")))
    assert verify_store(store) == [
        "sys_end.safetensors (position sys_end): NaN in centroids at persona 'p4', layer 3"]
    st = open_store(store)
    with pytest.raises(TlpersonaError, match=r"sys_end\.safetensors \(position sys_end\): NaN in "
                                             r"centroids at persona 'p4', layer 3; the store is damaged"):
        st.centroids("sys_end")
    with pytest.raises(TlpersonaError, match="NaN in centroids"):  # vectors inherit it
        st.persona_vector("p0", "sys_end", 1)
    out = tmp_path / "v.safetensors"
    with pytest.raises(TlpersonaError, match="NaN in centroids"):  # and exports
        export_vectors(st, VectorExport("p0", "sys_end", "safetensors", out), None)
    assert not out.exists()
    with pytest.raises(TlpersonaError, match="fails verification: sys_end"):
        open_store(store, verify=True)
    assert torch.isfinite(st.centroids("last")).all()  # the other positions stay readable


def test_inf_per_question_is_refused_by_every_reader(store):
    _rewrite(store, "last", _set("per_question", (7, 2, 1, 0), float("inf")))
    assert verify_store(store) == [
        "last.safetensors (position last): inf in per_question at persona 'p7', question 'q2', "
        "layer 3"]
    st = open_store(store)
    where = "inf in per_question at persona 'p7', question 'q2', layer 3"
    with pytest.raises(TlpersonaError, match=where):
        st.per_question("last")
    with pytest.raises(TlpersonaError, match=where):
        st.per_question("last", 3)
    with pytest.raises(TlpersonaError, match=where):
        st.per_question_rows("last", 6, 9)
    assert st.per_question("last", 1).shape == (N_P, N_Q, D)  # the clean layer and rows read
    assert st.per_question_rows("last", 0, 7).shape == (7, N_Q, len(LAYERS), D)
    assert torch.isfinite(st.centroids("last")).all()


def test_nan_store_refused_by_compare_before_results(store, tmp_path):
    from tlpersona.analyses.compare import CompareConfig, compare

    _rewrite(store, "prompt_mean", _set("per_question", (0, 0, 0, 0), float("nan")))
    with pytest.raises(TlpersonaError, match="NaN in per_question at persona 'p0'"):
        compare(open_store(store), CompareConfig(n_perm=9, n_splits=2))


def test_verify_reads_a_large_tensor_in_pieces(store, monkeypatch):
    import tlpersona.cache.reader as S

    monkeypatch.setattr(S, "_VERIFY_BYTES", 1)  # one persona row per read
    _rewrite(store, "last", _set("per_question", (N_P - 1, 0, 0, 3), float("-inf")))
    assert verify_store(store) == [
        "last.safetensors (position last): -inf in per_question at persona 'p11', question 'q0', "
        "layer 1"]


# position files swapped (manifest entries and all) -----------------------------------------


def _swap(root: Path, a: str, b: str) -> None:
    pa, pb, tmp = root / f"{a}.safetensors", root / f"{b}.safetensors", root / ".swap"
    pa.rename(tmp)
    pb.rename(pa)
    tmp.rename(pb)
    m = json.loads((root / "manifest.json").read_text())
    fa, fb = f"{a}.safetensors", f"{b}.safetensors"
    m["files"][fa], m["files"][fb] = m["files"][fb], m["files"][fa]
    (root / "manifest.json").write_text(json.dumps(m))


def test_swapped_position_files_are_found(store, tmp_path):
    _swap(store, "last", "prompt_mean")
    problems = verify_store(store)
    assert problems == [
        "last.safetensors holds position prompt_mean, not last (files swapped or renamed)",
        "prompt_mean.safetensors holds position last, not prompt_mean (files swapped or renamed)"]
    st = open_store(store)
    with pytest.raises(TlpersonaError, match="holds position prompt_mean, not last"):
        st.centroids("last")
    out = tmp_path / "v.npy"
    with pytest.raises(TlpersonaError, match="holds position prompt_mean, not last"):
        export_vectors(st, VectorExport("p1", "last", "npy", out, [1]), [1])
    assert not out.exists()


def test_a_file_of_another_store_is_found(store, tmp_path):
    other = _make(tmp_path / "o", {**PROV, "layers": [1, 4], "prompt_index": 1}, seed=1)
    shutil.copy(other / "last.safetensors", store / "last.safetensors")
    _rehash(store)
    assert verify_store(store) == [
        "last.safetensors belongs to another store (different layers, provenance)"]
    with pytest.raises(TlpersonaError, match="belongs to another store"):
        open_store(store).per_question("last", 1)


def test_new_files_record_their_identity(store):
    for pos in POSITIONS:
        with safe_open(str(store / f"{pos}.safetensors"), framework="pt") as f:
            meta = f.metadata()
        assert set(meta) == {"identity"}
        identity = json.loads(meta["identity"])
        assert identity["position"] == pos and json.loads(identity["layers"]) == LAYERS
        assert set(identity) == {"position", "layers", "personas_sha256", "store_sha256"}
    assert check_store(store).notes == [] and check_store(store).problems == []


@pytest.mark.parametrize("meta", [{"position": "last"}, None])
def test_store_of_an_earlier_version_reads_and_verify_notes_the_gap(store, meta):
    before = open_store(store).per_question("last").clone()
    _rewrite(store, "last", meta=meta)
    check = check_store(store)
    assert check.problems == []
    missing = "layers, persona list, provenance" if meta else "position, layers, persona list, provenance"
    assert check.notes == [f"last.safetensors: written by an earlier version that did not record "
                           f"its {missing}, which are not checked"]
    assert torch.equal(open_store(store).per_question("last"), before)


# a Store object whose directory is replaced ------------------------------------------------


def test_store_object_refuses_after_force_new_replaced_its_directory(store):
    st = open_store(store)
    old = st.centroids("last").clone()  # read (and cached) before the replacement
    _make(store, {**PROV, "prompt_index": 1}, seed=2, force_new=True)
    new = open_store(store)
    assert not torch.equal(new.centroids("last"), old)
    for read in (lambda: st.centroids("last"), lambda: st.per_question("last"),
                 lambda: st.per_question_rows("last", 0, 2), lambda: st.valid("sys_end"),
                 lambda: st.persona_vector("p1", "prompt_mean", 1)):
        with pytest.raises(TlpersonaError, match=r"changed after it was opened \(manifest\.json was "
                                                 r"replaced or modified\); open the store again"):
            read()


def test_store_object_refuses_a_position_file_rewritten_under_it(store):
    st = open_store(store)
    st.per_question("last", 1)
    _rewrite(store, "last", _set("per_question", (0, 0, 0, 0), 0.5), rehash=False)
    with pytest.raises(TlpersonaError, match=r"last\.safetensors was replaced or modified"):
        st.per_question("last")
    assert st.centroids("sys_end").shape == (N_P, len(LAYERS), D)  # its other files still read
    _rehash(store)
    with pytest.raises(TlpersonaError, match=r"manifest\.json was replaced"):
        st.centroids("sys_end")


def test_unchanged_store_object_reads_as_before(store):
    st = open_store(store)
    a = st.per_question("last")
    assert torch.equal(st.per_question("last"), a) and torch.equal(Store(store).per_question("last"), a)


def test_a_renumbered_inode_alone_is_not_a_change_but_new_content_is(store, monkeypatch):
    """FUSE mounts renumber a file's inode when their cache drops it: same mtime, size and
    content read on; a manifest with other content under the same mtime and size is refused."""
    import tlpersona.cache.reader as store_mod

    st = open_store(store)
    a = st.per_question("last")
    real = store_mod._fingerprint

    def renumbered(path):
        fp = real(path)
        return None if fp is None else (fp[0], fp[1] + 1, fp[2], fp[3])

    monkeypatch.setattr(store_mod, "_fingerprint", renumbered)
    assert torch.equal(st.per_question("last"), a)
    manifest = store / "manifest.json"
    text, stat = manifest.read_text(), manifest.stat()
    other = text.replace('"prompt_index": 0', '"prompt_index": 7')
    assert other != text and len(other) == len(text)
    manifest.write_text(other)
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(TlpersonaError, match="changed after it was opened"):
        st.per_question("last")


# parts left by a run with other settings ---------------------------------------------------


def _killed_after_first_part(root: Path) -> None:
    w = StoreWriter(root, PROV, {"d_model": D})
    w.write_part(0, _persona(0))


def test_stale_part_of_other_settings_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "s"
    _killed_after_first_part(root)
    (root / "manifest.json").unlink()
    with pytest.raises(TlpersonaError, match=r"parts/00000-00001\.safetensors was made by a run "
                                             r"with a different prompt_index; use `force_new`"):
        StoreWriter(root, {**PROV, "prompt_index": 1}, {"d_model": D})
    assert not (root / "manifest.json").exists()
    assert (root / "parts" / "00000-00001.safetensors").exists()  # nothing removed either
    w = StoreWriter(root, {**PROV, "prompt_index": 1}, {"d_model": D}, force_new=True)
    assert w.finished() == {}


def test_stale_parts_can_be_refused_before_responses_are_settled(tmp_path):
    root = tmp_path / "s"
    _killed_after_first_part(root)
    (root / "manifest.json").unlink()
    later = frozenset({"responses_hash"})
    with pytest.raises(TlpersonaError, match="different prompt_index;"):
        check_parts(root, {**PROV, "prompt_index": 1, "responses_hash": "abc"}, later)
    check_parts(root, {**PROV, "responses_hash": "abc"}, later)  # the same run, responses to come
    with pytest.raises(TlpersonaError, match="different responses_hash;"):
        check_parts(root, {**PROV, "responses_hash": "abc"})
    check_parts(tmp_path / "nothing", PROV)


def test_stale_part_under_a_matching_manifest_is_refused(tmp_path):
    root = tmp_path / "s"
    _killed_after_first_part(root)
    (root / "manifest.json").unlink()
    StoreWriter(root, PROV, {"d_model": D})  # same settings: resumes
    m = json.loads((root / "manifest.json").read_text())
    m["provenance"]["prompt_index"] = 1
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TlpersonaError, match="different prompt_index"):
        StoreWriter(root, {**PROV, "prompt_index": 1}, {"d_model": D}).finished()


def test_part_of_same_settings_is_resumed_after_manifest_loss(tmp_path):
    root = tmp_path / "s"
    _killed_after_first_part(root)
    (root / "manifest.json").unlink()
    w = StoreWriter(root, PROV, {"d_model": D})
    assert list(w.finished()) == [0]
    for i in range(1, N_P):
        w.write_part(i, _persona(i))
    w.finalize()
    ref = _make(tmp_path / "ref")
    a, b = open_store(root), open_store(ref)
    assert torch.equal(a.per_question("last"), b.per_question("last"))
    assert torch.equal(a.centroids("sys_end"), b.centroids("sys_end"))


def test_part_without_provenance_needs_a_manifest_to_vouch_for_it(tmp_path):
    root = tmp_path / "s"
    _killed_after_first_part(root)
    part = root / "parts" / "00000-00001.safetensors"
    with safe_open(str(part), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(part))  # as an earlier version wrote parts
    assert list(StoreWriter(root, PROV, {"d_model": D}).finished()) == [0]
    (root / "manifest.json").unlink()
    with pytest.raises(TlpersonaError, match="does not record the settings it was made with"):
        StoreWriter(root, PROV, {"d_model": D})
    assert not (root / "manifest.json").exists()


# float16 overflow at write time --------------------------------------------------------------


def test_fp16_overflow_is_refused_at_write_naming_persona_position_layer(tmp_path):
    root = tmp_path / "s"
    w = StoreWriter(root, PROV, {"d_model": D})
    w.write_part(0, _persona(0))
    t = _persona(2)
    per_q = t["prompt_mean/per_question"].float()
    per_q[2, 1, 3] = 70000.0  # finite in float32, inf in float16
    t["prompt_mean/per_question"] = per_q.half()
    assert torch.isfinite(t["prompt_mean/centroid"]).all()
    with pytest.raises(TlpersonaError, match=r"^position prompt_mean: inf in per_question at "
                                             r"persona 'p2', question 'q2', layer 3 \(beyond "
                                             r"float16's range of ±65504\); nothing of this group"):
        w.write_group(1, [_persona(1), t])
    assert sorted(p.name for p in (root / "parts").iterdir()) == ["00000-00001.safetensors"]
    t = _persona(1)
    t["sys_end/centroid"][0, 0] = float("nan")
    with pytest.raises(TlpersonaError, match="position sys_end: NaN in centroids at persona 'p1', "
                                             "layer 1; nothing"):
        w.write_part(1, t)


def test_verify_hashes_what_it_scans_exactly(store, tmp_path):
    """One pass computes the sha256 and the NaN/inf check: the hash equals hashlib's over the
    file's bytes, also for files the scan cannot follow (truncated, extra bytes, bad header)."""
    import hashlib

    from tlpersona.cache.reader import _scan_file

    src = (store / "last.safetensors").read_bytes()
    variants = {"as written": src, "truncated": src[:-5], "trailing bytes": src + b"xyz",
                "bad header": src[:8] + b"{" + src[9:], "empty": b"", "short": src[:5]}
    for what, data in variants.items():
        path = tmp_path / "f.safetensors"
        path.write_bytes(data)
        digest, where = _scan_file(path, open_store(store).labels)
        assert digest == hashlib.sha256(data).hexdigest(), what
        assert where is None, what


# through the command line ---------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, list[str], str]:
    from click.testing import CliRunner

    from tlpersona.cli import main

    res = CliRunner().invoke(main, list(args))
    return res.exit_code, [x for x in res.output.splitlines() if x.startswith("error:")], res.output


def test_cli_verify_and_export_refuse_nan_and_swapped_stores(store, tmp_path):
    _rewrite(store, "sys_end", _set("centroids", (4, 1, 2), float("nan")))
    code, errors, output = _cli("verify", str(store))
    assert code == 2 and "Traceback" not in output
    assert errors == [f"error: {store} fails verification: sys_end.safetensors (position sys_end): "
                      "NaN in centroids at persona 'p4', layer 3"]
    out = tmp_path / "v.npy"
    code, errors, _ = _cli("export", str(store), "--vectors", "npy", "--persona", "p0",
                           "--position", "sys_end", "--layers", "1", "--out", str(out))
    assert code == 2 and len(errors) == 1 and "NaN in centroids" in errors[0]
    assert not out.exists()
    _swap(store, "last", "prompt_mean")
    code, errors, _ = _cli("export", str(store), "--vectors", "npy", "--persona", "p0",
                           "--position", "prompt_mean", "--layers", "1", "--out", str(out))
    assert code == 2 and len(errors) == 1 and "holds position last, not prompt_mean" in errors[0]
    assert not out.exists()


def test_a_resumed_writer_removes_what_a_kill_left_half_written(tmp_path):
    """A kill during the manifest's write leaves ``.manifest.json.XXXXXXXX``: the next writer of
    the store removes it (the store's own file), a rank that is not the store's one writer
    leaves it, and the resumed store finishes with no temporary file."""
    root = tmp_path / "s"
    _killed_after_first_part(root)
    stale = root / ".manifest.json.41qr3whr"
    stale.write_text('{"format": "tlpers')
    StoreWriter(root, PROV, {"d_model": D}, tidy=False)
    assert stale.exists()
    w = StoreWriter(root, PROV, {"d_model": D})
    assert not stale.exists() and (root / "manifest.json").exists()
    assert list(w.finished()) == [0]
