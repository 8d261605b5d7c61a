"""A user's data is never destroyed, overwritten or mislabelled (issue 12).

Each test tries one class of careless or unlucky use and checks the outcome: one error line,
exit code 2, and every file the user had still byte-identical (or the result correct).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from factories import SMALL, seed_layout, small_store
from factories import copy_store as _copy
from factories import fails as _fails
from factories import run as _run
from factories import snapshot as _snapshot

from tlpersona.cache import open_store, verify_store
from tlpersona.cache.ownership import clear_store
from tlpersona.cache.seed_layout import export_seed, read_seed
from tlpersona.chat.positions import parse_positions
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.errors import TlpersonaError
from tlpersona.extraction import ExtractConfig, extract_to_store


@pytest.fixture(scope="module")
def store(loaded, tmp_path_factory) -> Path:
    return small_store(loaded, tmp_path_factory.mktemp("safety") / "store")


def _personas_dir(tmp: Path, roles: dict[str, str], raw: str | None = None) -> Path:
    d = tmp / "personas"
    (d / "instructions").mkdir(parents=True)
    (d / "role_list.json").write_text(raw if raw is not None else json.dumps({r: "x" for r in roles}))
    for role, prompt in roles.items():
        try:
            (d / "instructions" / f"{role}.json").write_text(json.dumps({"instruction": [{"pos": prompt}]}))
        except OSError:
            pass  # a name no file can have
    return d


def _tamper(store: Path, fn) -> None:
    m = json.loads((store / "manifest.json").read_text())
    fn(m)
    (store / "manifest.json").write_text(json.dumps(m))


# --- 1. persona names become file names -----------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("../../x/model", "path separator"), ("/abs/path", "path separator"), ("sub/role", "path separator"),
    ("all_centroids", "reserved"), ("bob__per_q", "reserved"), (".hidden", "starts with a dot"),
    ("a\nb", "line-break"), ("r" * 300, "longer than 200 bytes"), (" pad", "white space"),
])
def test_unsafe_persona_names_are_refused_where_they_enter(tmp_path, name, message):
    d = _personas_dir(tmp_path, {"ok": "You are fine.", name: "You are odd."})
    _fails(message, "extract", "--personas", str(d), "--out", str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_duplicate_persona_names_are_refused(tmp_path):
    d = _personas_dir(tmp_path, {"Pirate": "You are a pirate.", "pirate": "You are a pirate too."})
    _fails("duplicate persona name 'pirate'", "extract", "--personas", str(d), "--out", str(tmp_path / "s"))


def test_export_refuses_a_manifest_with_unsafe_names_and_writes_nothing(store, tmp_path):
    bad = _copy(store, tmp_path)
    _tamper(bad, lambda m: m["provenance"]["personas"].__setitem__(1, "../../escaped"))
    seed = tmp_path / "deep" / "seed"
    _fails("path separator", "export", str(bad), "--seed-layout", str(seed))
    _fails("path separator", "verify", str(bad))
    assert not (tmp_path / "deep").exists() and not (tmp_path / "escaped.pt").exists()


# --- 2. --force-new deletes only what the store owns, after every check ---------------------

@pytest.mark.model
def test_force_new_on_a_foreign_manifest_touches_nothing(tmp_path):
    d = tmp_path / "project"
    d.mkdir()
    (d / "manifest.json").write_text('{"name": "my web app"}')
    (d / "index.js").write_text("console.log(1)")
    before = _snapshot(d)
    _fails("unknown dtype 'fp8'", "extract", *SMALL, "--out", str(d), "--force-new", "--dtype", "fp8")
    _fails("not a tlpersona store manifest", "extract", *SMALL, "--out", str(d), "--force-new")
    assert _snapshot(d) == before


def test_force_new_with_a_bad_option_keeps_the_store(store, tmp_path):
    s = _copy(store, tmp_path)
    before = _snapshot(s)
    _fails("layer 99 is out of range", "extract", *SMALL, "--out", str(s), "--force-new", "--layers", "3,99")
    assert _snapshot(s) == before and verify_store(s) == []


def test_force_new_never_deletes_foreign_files(store, tmp_path):
    s = _copy(store, tmp_path)
    (s / "notes.md").write_text("my notes")
    before = _snapshot(s)
    _fails("notes.md, which is not the store's", "extract", *SMALL, "--out", str(s), "--force-new",
           "--positions", "last", "--layers", "3")
    assert _snapshot(s) == before
    with pytest.raises(TlpersonaError, match="notes.md"):
        clear_store(s)
    (s / "notes.md").unlink()
    (s / "parts").mkdir()
    (s / "parts" / "00000-00002.safetensors").write_bytes(b"x")
    (s / ".manifest.json.abc123").write_bytes(b"x")  # a killed writer's temporary file
    removed = {p.name for p in clear_store(s)}
    assert removed == {"manifest.json", "last.safetensors", "sys_end.safetensors",
                       "00000-00002.safetensors", ".manifest.json.abc123"}
    assert [p.name for p in s.iterdir()] in ([], ["tlpersona.lock"])


def test_force_new_keeps_a_responses_file_given_inside_out(loaded, tmp_path):
    """--responses OUT/x.jsonl with --force-new: the file is read, kept and used."""
    out = tmp_path / "s"
    out.mkdir()
    eos = loaded.tokenizer.eos_token_id
    rows = [{"persona": p.name, "prompt_index": 0, "question_id": q.id,
             "response_ids": [400 + i, 500, eos], "finished": True}
            for i, p in enumerate(builtin_personas()[:2]) for q in builtin_questions()[:2]]
    resp = out / "mine.jsonl"
    resp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = resp.read_bytes()
    code, _, output = _run("extract", *SMALL, "--out", str(out), "--force-new", "--responses", str(resp),
                           "--positions", "last,response_mean", "--layers", "3")
    assert code == 0, output[-1500:]
    assert resp.read_bytes() == before
    assert open_store(out).valid("response_mean").all()


def test_force_new_on_a_symlink_is_refused(store, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(store)
    before = _snapshot(store)
    _fails("symbolic link", "extract", *SMALL, "--out", str(link), "--force-new")
    assert _snapshot(store) == before


# --- 3. files in --out that are not ours are refused untouched -------------------------------

@pytest.mark.model
def test_foreign_responses_file_in_out_is_not_touched(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "responses.jsonl").write_text('{"my": "own data"}\n{"half": ')
    before = _snapshot(out)
    _fails("not a tlpersona responses file", "extract", *SMALL, "--out", str(out),
           "--positions", "last,response_mean", "--layers", "3")
    assert _snapshot(out) == before


def test_generate_into_a_foreign_file_is_refused(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\nno newline at the end")
    _fails("not a tlpersona responses file", "generate", *SMALL, "--out", str(notes))
    assert notes.read_text() == "# my notes\nno newline at the end"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]  # no lock file left either


@pytest.mark.model
def test_extract_into_a_foreign_directory_is_refused_before_generation(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("x")
    _fails("not empty and is not a tlpersona store", "extract", *SMALL, "--out", str(out),
           "--positions", "last,response_mean", "--layers", "3")
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex"]


# --- 4. responses carry their own provenance -------------------------------------------------

@pytest.fixture(scope="module")
def generated(default_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "responses.jsonl"
    code, _, output = _run("generate", *SMALL, "--max-new-tokens", "3", "--out", str(out))
    assert code == 0, output[-1500:]
    return out


def test_responses_record_their_provenance(generated, default_source):
    from tlpersona.models.loading import resolve

    lines = [json.loads(x) for x in generated.read_text().splitlines()]
    head = lines[0]
    assert head["tlpersona_responses"] == 1 and head["max_new_tokens"] == 3
    assert head["model_identity"] == resolve("default")[1] and head["dtype"] == "float32"
    assert len(lines) == 5 and all(len(x["prompt_sha"]) == 20 for x in lines[1:])


def test_rerun_with_other_generation_settings_is_refused(generated, tmp_path):
    f = tmp_path / "r.jsonl"
    shutil.copy(generated, f)
    before = f.read_bytes()
    _fails("different max_new_tokens (3, this run 5)", "generate", *SMALL, "--max-new-tokens", "5",
           "--out", str(f))
    lines = f.read_text().splitlines()
    head = json.loads(lines[0])
    head["model_identity"] = "another model"
    f.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    _fails("different model_identity", "generate", *SMALL, "--max-new-tokens", "3", "--out", str(f))
    # extract reusing OUT/responses.jsonl checks the same
    out = tmp_path / "store"
    out.mkdir()
    shutil.copy(f, out / "responses.jsonl")
    _fails("different model_identity", "extract", *SMALL, "--max-new-tokens", "3", "--out", str(out),
           "--positions", "last,response_mean", "--layers", "3")
    f.write_bytes(before)
    row = json.loads(lines[1])
    row["prompt_sha"] = "0" * 20
    f.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    _fails("continues a different prompt", "generate", *SMALL, "--max-new-tokens", "3", "--out", str(f))


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_new_tokens_must_be_positive(tmp_path, value):
    _fails("--max-new-tokens must be at least 1", "generate", *SMALL, "--max-new-tokens", value,
           "--out", str(tmp_path / "r.jsonl"))
    _fails("--max-new-tokens must be at least 1", "extract", *SMALL, "--max-new-tokens", value,
           "--positions", "b", "--out", str(tmp_path / "s"))
    assert not list(tmp_path.iterdir())


# --- 5. a seed layout never mixes stores -------------------------------------------------------

def test_export_replaces_another_stores_layout_and_reader_refuses_mixtures(loaded, store, tmp_path):
    cfg = ExtractConfig(parse_positions("last"), [3, 29], batch_size=8, progress=False)
    other = extract_to_store(loaded, cfg, builtin_personas()[4:7], builtin_questions()[:2], tmp_path / "b")
    seed = tmp_path / "seed"
    export_seed(open_store(store), seed)
    (seed / "method_c2" / "README.txt").write_text("a user's note")
    export_seed(open_store(other), seed)  # B has no c2: A's method_c2 files go, the note stays
    assert sorted(p.name for p in (seed / "method_c2").iterdir()) == ["README.txt"]
    back = read_seed(seed)
    assert back.personas == open_store(other).personas and back.positions == ["last"]
    assert sorted(p.name for p in (seed / "method_a").iterdir() if p.name.endswith(".pt")) == sorted(
        ["all_centroids.pt"] + [f"{n}{s}.pt" for n in back.personas for s in ("", "__per_q")])
    mixed = tmp_path / "mixed"
    export_seed(open_store(store), mixed)
    shutil.rmtree(mixed / "method_a")
    shutil.copytree(seed / "method_a", mixed / "method_a")
    _fails("come from different sources", "compare", "--from-seed", str(mixed), "--out", str(tmp_path / "c"))


def test_export_refuses_a_layout_it_did_not_write(store, tmp_path):
    seed = tmp_path / "seed"
    (seed / "method_a").mkdir(parents=True)
    torch.save({"r": torch.zeros(2, 3)}, seed / "method_a" / "all_centroids.pt")
    before = _snapshot(seed)
    _fails("did not write", "export", str(store), "--seed-layout", str(seed))
    assert _snapshot(seed) == before


# --- 6. project --text needs raw_system_last ----------------------------------------------------

def test_project_text_without_raw_system_last_is_an_error(store, tmp_path):
    _fails("raw_system_last", "project", str(store), "--text", "You are a cat.", "--out", str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


# --- 7. an analysis is never written into a store (locks: tests/reliability/test_locks.py) --------

def test_an_analysis_is_never_written_into_a_store(store, tmp_path):
    s = _copy(store, tmp_path)
    before = _snapshot(s)
    _fails("is a store's directory", "compare", str(s), "--out", str(s))
    _fails("is a store's directory", "project", str(s), "--out", str(s / "parts"))
    _fails("is a store's directory", "project", str(s), "--out", str(s / "figures"))
    assert _snapshot(s) == before
    import tlpersona as tlp

    with pytest.raises(TlpersonaError, match="is a store's directory"):
        tlp.project(s).save(s)
    assert _snapshot(s) == before


# --- 8. verify checks the manifest's schema and paths -------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda m: m["provenance"].__setitem__("personas", "assistant"), "personas is not a non-empty list"),
    (lambda m: m["provenance"]["personas"].__setitem__(1, m["provenance"]["personas"][0]), "duplicates"),
    (lambda m: m["provenance"].__setitem__("layers", [3]), "does not fit"),
    (lambda m: m["provenance"]["questions"].append("extra"), "does not fit"),
    (lambda m: m["files"].__setitem__("/dev/zero", m["files"]["last.safetensors"]), "not a file of its"),
    (lambda m: m["files"].__setitem__("../x.safetensors", m["files"]["last.safetensors"]),
     "not a file of its"),
    (lambda m: m.__setitem__("complete", "false"), "incomplete"),
])
def test_verify_refuses_a_malformed_manifest(store, tmp_path, change, message):
    bad = _copy(store, tmp_path)
    _tamper(bad, change)
    _fails(message, "verify", str(bad))


def test_verify_does_not_read_device_files(store, tmp_path):
    bad = _copy(store, tmp_path)
    (bad / "last.safetensors").unlink()
    (bad / "last.safetensors").symlink_to("/dev/zero")
    t0 = time.perf_counter()
    _fails("last.safetensors: not a regular file", "verify", str(bad))
    assert time.perf_counter() - t0 < 30


# --- 9. the seed-layout reader validates what it reads ------------------------------------------

def _seed(tmp: Path, data: object, meta: object | None = None, per_q: dict | None = None) -> Path:
    d = tmp / "seed" / "method_a"
    d.mkdir(parents=True)
    torch.save(data, d / "all_centroids.pt")
    if meta is not None:
        (d / "metadata.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    for name, t in (per_q or {}).items():
        torch.save(t, d / f"{name}__per_q.pt")
    return tmp / "seed"


@pytest.mark.parametrize("data, meta, per_q, message", [
    ({"r": torch.zeros(2, 4), "s": torch.zeros(3, 4)}, None, None, "expected [2, 4]"),
    ({"r": torch.zeros(2, 4), "s": torch.full((2, 4), float("nan"))}, None, None, "not a finite"),
    ({"r": torch.zeros(2, 4), "s": [1.0, 2.0]}, None, None, "expected a tensor"),
    ({"r": torch.zeros(2, 4)}, "{not json", None, "invalid JSON"),
    ({"r": torch.zeros(2, 4)}, {"layers": "37"}, None, "'layers' must be a list"),
    ({"r": torch.zeros(2, 4)}, {"layers": [3, 7, 9]}, None, "lists 3 layers, the tensors have 2"),
    ({"r": torch.zeros(2, 4), "s": torch.ones(2, 4)}, None,
     {"r": torch.zeros(3, 2, 4), "s": torch.zeros(3, 2, 5)}, "disagree in shape"),
    ({"../r": torch.zeros(2, 4)}, None, None, "path separator"),
])
def test_seed_reader_refuses_bad_files(tmp_path, data, meta, per_q, message):
    seed = _seed(tmp_path, data, meta, per_q)
    _fails(message, "compare", "--from-seed", str(seed), "--out", str(tmp_path / "c"))


# --- 10. every persona and question is checked before the first forward pass --------------------

@pytest.mark.model
def test_bad_layer_with_response_positions_fails_before_generation(tmp_path):
    out = tmp_path / "s"
    _fails("layer 99 is out of range", "extract", *SMALL, "--positions", "last,response_mean",
           "--layers", "3,99", "--out", str(out))
    assert not out.exists()


@pytest.mark.model
def test_an_offset_only_a_later_persona_violates_fails_before_any_work(tmp_path):
    long = "You are a ship's navigator. " * 8
    d = _personas_dir(tmp_path, {"first": long, "second": long, "third": "You are brief."})
    out = tmp_path / "s"
    _fails("persona 'third'", "extract", "--personas", str(d), "--limit-questions", "2",
           "--positions", "user_start-40", "--layers", "3", "--batch-size", "1", "--out", str(out))
    assert not out.exists()


# --- 11. analyses on the smallest valid input ----------------------------------------------------

def test_subspace_on_four_personas_and_small_k(tmp_path):
    seed = seed_layout(tmp_path / "seed", [f"r{i}" for i in range(4)])
    code, _, output = _run("subspace", "--from-seed", str(seed), "--out", str(tmp_path / "sub"))
    assert code == 0, output[-2000:]
    # strict JSON: no bare NaN (undefined statistics are null)
    result = json.loads((tmp_path / "sub" / "subspace.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"bare {c} in subspace.json"))
    assert result["layers"][0]["held_out_curve"][1]["pairs"]["last~prompt_mean"]["mc_r"] is None
    _fails("--k-max must be at least 2", "subspace", "--from-seed", str(seed), "--k-max", "1",
           "--out", str(tmp_path / "sub1"))


def test_project_with_more_pcs_than_exist(store, tmp_path):
    _fails("--k 1000: only", "project", str(store), "--axis", "pcs", "--k", "1000",
           "--out", str(tmp_path / "p"))


# --- 12. user errors are one line, never a traceback ---------------------------------------------

def test_user_errors_are_one_line(store, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("mine")
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes('{"question": "caf\xe9?"}\n'.encode("latin-1"))
    a_dir = tmp_path / "dir.jsonl"
    a_dir.mkdir()
    ext = ["extract", *SMALL]
    _fails("is a file, not a directory", *ext, "--out", str(f))
    _fails("is a file, not a directory", "compare", str(store), "--out", str(f))
    _fails("is a directory", *ext, "--questions", str(a_dir), "--out", str(tmp_path / "s"))
    _fails("not UTF-8", *ext, "--questions", str(bad_utf8), "--out", str(tmp_path / "s"))
    _fails("not a directory", *ext, "--personas", str(f), "--out", str(tmp_path / "s"))
    _fails("is a directory", *ext, "--positions", "b", "--responses", str(a_dir),
           "--out", str(tmp_path / "s"))
    _fails("is a directory", "project", str(store), "--conversations", str(a_dir),
           "--out", str(tmp_path / "p"))
    _fails("is not a regular file", "generate", *SMALL, "--out", str(a_dir))
    _fails("--splits must be at least 1", "compare", str(store), "--splits", "0",
           "--out", str(tmp_path / "c"))
    _fails("--limit-personas must be at least 0", *ext[:1], "--limit-personas", "-1",
           "--out", str(tmp_path / "s"))
    _fails("--alphas must be finite", "steer", str(store), "--alphas", "0,nan,inf",
           "--out", str(tmp_path / "pt"))
    assert f.read_text() == "mine" and not (tmp_path / "s").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    _fails("no CUDA GPU", "extract", *SMALL, "--device", "cuda", "--out", str(tmp_path / "s"))
    _fails("unknown --device", "extract", *SMALL, "--device", "gpu0", "--out", str(tmp_path / "s"))


def test_read_only_out_is_one_line(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere: let the permission check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: real(p, m) and Path(p) != ro)
    _fails("is not writable", "extract", *SMALL, "--out", str(ro / "s"))
    _fails("is not writable", "generate", *SMALL, "--out", str(ro / "r.jsonl"))
    assert not list(ro.iterdir())


@pytest.mark.model
def test_response_ids_outside_the_vocabulary(tmp_path):
    rows = [{"persona": p.name, "prompt_index": 0, "question_id": q.id,
             "response_ids": [10 ** 7], "finished": False}
            for p in builtin_personas()[:2] for q in builtin_questions()[:2]]
    resp = tmp_path / "r.jsonl"
    resp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails("outside the model's vocabulary", "extract", *SMALL, "--positions", "b", "--responses", str(resp),
           "--layers", "3", "--out", str(tmp_path / "s"))
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_damaged_or_stray_part_files_on_resume(loaded, tmp_path):
    class Stop(Exception):
        pass

    def stop(_group):
        raise Stop

    personas, questions = builtin_personas()[:4], builtin_questions()[:1]
    cfg = ExtractConfig(parse_positions("last"), [3], batch_size=8, progress=False)
    out = tmp_path / "s"
    with pytest.raises(Stop):
        extract_to_store(loaded, cfg, personas, questions, out, on_group=stop)
    part = next((out / "parts").iterdir())
    part.write_bytes(part.read_bytes()[:-7])  # truncated
    with pytest.raises(TlpersonaError, match="is damaged"):
        extract_to_store(loaded, cfg, personas, questions, out)
    part.unlink()
    (out / "parts" / "00000-00099.safetensors").write_bytes(b"")  # more personas than the store has
    with pytest.raises(TlpersonaError, match="not a part file of this store"):
        extract_to_store(loaded, cfg, personas, questions, out)
    (out / "parts" / "00000-00099.safetensors").unlink()
    extract_to_store(loaded, cfg, personas, questions, out)
    assert verify_store(out) == []


# --- 13. smaller things ---------------------------------------------------------------------------

def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path):
    from tlpersona.data import load_questions_jsonl

    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "one\u2028two\u0085three?", "id": "a"}, ensure_ascii=False)
                 + "\n" + json.dumps({"question": "next?", "id": "b"}) + "\n", encoding="utf-8")
    qs = load_questions_jsonl(f)
    assert [q.id for q in qs] == ["a", "b"] and qs[0].text == "one\u2028two\u0085three?"


def test_duplicate_keys_in_role_list_are_refused(tmp_path):
    d = _personas_dir(tmp_path, {"a": "You are A."}, raw='{"a": "x", "a": "y"}')
    _fails("duplicate key 'a'", "extract", "--personas", str(d), "--out", str(tmp_path / "s"))


def test_finished_must_be_a_boolean(tmp_path):
    from tlpersona.data.responses import read_responses

    f = tmp_path / "r.jsonl"
    row = {"persona": "a", "prompt_index": 0, "question_id": "q", "response_ids": [1], "finished": "false"}
    f.write_text(json.dumps(row) + "\n" + json.dumps({**row, "question_id": "q2", "finished": False}) + "\n")
    with pytest.raises(TlpersonaError, match="finished must be true or false"):
        read_responses(f)


def test_store_files_follow_the_umask(store):
    mask = os.umask(0o022)
    os.umask(mask)
    for p in store.iterdir():
        if p.is_file() and p.name != "tlpersona.lock":
            assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_prompt_longer_than_the_context_is_refused(default_source, tmp_path):
    d = tmp_path / "short-context"
    d.mkdir()
    for f in Path(default_source).iterdir():
        if f.name != "config.json":
            os.symlink(f, d / f.name)
    config = json.loads((Path(default_source) / "config.json").read_text())
    config["max_position_embeddings"] = 40
    (d / "config.json").write_text(json.dumps(config))
    _fails("exceeds the model's context of 40 tokens", "generate", *SMALL, "--model", str(d),
           "--out", str(tmp_path / "r.jsonl"))
    assert not (tmp_path / "r.jsonl").exists()
