"""Faults and bad input: killed runs, full disks, corrupted files, NaNs, bad options.

Each bad input must give one error line and exit code 2 with nothing written; each fault must
leave a valid store that the same command resumes to a bit-identical result.
"""

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tlpersona.cache import open_store, verify_store
from tlpersona.chat.positions import parse_positions
from tlpersona.cli import main
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.errors import TlpersonaError
from tlpersona.extraction import ExtractConfig, Extractor, extract_to_store

ARGS = ["extract", "--limit-personas", "6", "--limit-questions", "3",
        "--positions", "last,sys_end,response_mean", "--layers", "5,29",
        "--max-new-tokens", "6", "--batch-size", "4"]
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _same_store(a: Path, b: Path) -> None:
    sa, sb = open_store(a), open_store(b)
    assert sa.positions == sb.positions
    for pos in sa.positions:
        assert torch.equal(sa.centroids(pos), sb.centroids(pos)), pos
        if sa.has_per_question(pos):
            assert torch.equal(sa.per_question(pos), sb.per_question(pos)), pos
            assert torch.equal(sa.valid(pos), sb.valid(pos)), pos


def _cli(*args):
    return [sys.executable, "-m", "tlpersona.cli", *args]


@pytest.fixture(scope="module")
def reference(default_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    t0 = time.perf_counter()
    subprocess.run(_cli(*ARGS, "--out", str(out)), check=True, capture_output=True)
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_sigkill_at_random_points_then_resume(reference, tmp_path, seed):
    ref, ref_seconds = reference
    out = tmp_path / "store"
    proc = subprocess.Popen(_cli(*ARGS, "--out", str(out)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.2, 1.0) * ref_seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = (out / "manifest.json").exists() and '"complete": true' in (out / "manifest.json").read_text()
    parts = list((out / "parts").glob("*.safetensors")) if (out / "parts").exists() else []
    saved = sum(int(p.stem.split("-")[1]) - int(p.stem.split("-")[0]) for p in parts)
    res = subprocess.run(_cli(*ARGS, "--out", str(out)), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    computed, reused = (int(x) for x in re.search(
        r"extracted (\d+) personas \((\d+) already in the store\)", res.stderr).groups())
    # every saved persona is reused and none is computed twice
    assert reused == (6 if complete else saved) and computed == 6 - reused
    _same_store(out, ref)
    assert verify_store(out) == []
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files left behind


def test_disk_full_leaves_a_valid_resumable_store(loaded, tmp_path, monkeypatch):
    import safetensors.torch as store_mod  # tlpersona.infra.files imports save_file at each call

    personas, questions = builtin_personas()[:4], builtin_questions()[:2]
    cfg = ExtractConfig(parse_positions("last,sys_end"), [3, 29], batch_size=4, progress=False)
    ref = tmp_path / "ref"
    extract_to_store(loaded, cfg, personas, questions, ref)
    real = store_mod.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")  # a half-written temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(store_mod, "save_file", full_disk)
    out = tmp_path / "s"
    with pytest.raises(TlpersonaError, match="No space left on device"):
        extract_to_store(loaded, cfg, personas, questions, out)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # the temporary file is gone
    monkeypatch.setattr(store_mod, "save_file", real)
    extract_to_store(loaded, cfg, personas, questions, out)
    _same_store(out, ref)


def test_nan_activations_are_reported_with_persona_and_layer(loaded, tmp_path, monkeypatch):
    personas, questions = builtin_personas()[:2], builtin_questions()[:2]
    cfg = ExtractConfig(parse_positions("last"), [3, 29], batch_size=4, progress=False)
    real = Extractor.run

    def poisoned(self, seqs, weights):
        out = real(self, seqs, weights)
        out[0, :, 1] = float("nan")
        return out

    monkeypatch.setattr(Extractor, "run", poisoned)
    with pytest.raises(TlpersonaError, match=r"non-finite activations .* at layer 29"):
        extract_to_store(loaded, cfg, personas, questions, tmp_path / "s")
    assert not (tmp_path / "s" / "parts").exists() or not list((tmp_path / "s" / "parts").iterdir())


def test_verify_names_corrupted_and_missing_files(loaded, tmp_path):
    cfg = ExtractConfig(parse_positions("last,sys_end"), [3], batch_size=4, progress=False)
    out = tmp_path / "s"
    extract_to_store(loaded, cfg, builtin_personas()[:4], builtin_questions()[:2], out)
    assert verify_store(out) == []
    data = bytearray((out / "last.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (out / "last.safetensors").write_bytes(bytes(data))
    (out / "sys_end.safetensors").unlink()
    problems = verify_store(out)
    assert any("last.safetensors: checksum mismatch" in p for p in problems)
    assert any("sys_end.safetensors: missing" in p for p in problems)
    runner = CliRunner()
    res = runner.invoke(main, ["verify", str(out)])
    assert res.exit_code == 2 and "checksum mismatch" in res.output
    res = runner.invoke(main, ["compare", str(out), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 2 and "fails verification" in res.output
    assert not (tmp_path / "cmp").exists()


def _gemma_model_dir(source: str, tmp: Path) -> Path:
    d = tmp / "gemma-style"
    d.mkdir()
    for f in Path(source).iterdir():
        if f.name != "chat_template.jinja":
            os.symlink(f, d / f.name)
    (d / "chat_template.jinja").write_text(GEMMA_STYLE)
    return d


def _bad_inputs(tmp: Path, source: str) -> list[tuple[list[str], str]]:
    personas = tmp / "personas"
    (personas / "instructions").mkdir(parents=True)
    (personas / "role_list.json").write_text('{"a": "x", "b": "y"}')
    (personas / "instructions" / "a.json").write_text('{"instruction": [{"pos": "Be A."}]}')
    (personas / "instructions" / "b.json").write_text('{"instruction": [{"pos": ""}]}')
    nopos = tmp / "nopos"
    shutil.copytree(personas, nopos)
    (nopos / "instructions" / "b.json").write_text('{"instruction": [{"neg": "x"}]}')
    badjson = tmp / "badjson"
    shutil.copytree(personas, badjson)
    (badjson / "instructions" / "b.json").write_text("{oops")
    missing = tmp / "missing"
    shutil.copytree(personas, missing)
    (missing / "instructions" / "b.json").unlink()
    dup = tmp / "dup.jsonl"
    dup.write_text('{"question": "x?", "id": 1}\n{"question": "y?", "id": 1}\n')
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    junk = tmp / "junk.gguf"
    junk.write_bytes(b"GGUF not really")
    resp = tmp / "resp.jsonl"
    resp.write_text('{"persona": "nobody", "prompt_index": 0, "question_id": "q000", '
                    '"response_ids": [1, 2], "finished": false}\n')
    return [
        (["--positions", "sys_middle"], "unknown position 'sys_middle'"),
        (["--positions", "last+3"], "outside the sequence"),
        (["--model", str(_gemma_model_dir(source, tmp)), "--positions", "sys_end"], "no system role"),
        (["--personas", str(personas)], "empty system prompt"),
        (["--personas", str(missing)], "role 'b' has no file"),
        (["--personas", str(badjson)], "invalid JSON"),
        (["--personas", str(nopos)], "has no 'pos'"),
        (["--questions", str(dup)], "duplicate question id '1'"),
        (["--questions", str(empty)], "no questions"),
        (["--layers", "30"], "layer 30 is out of range for a 30-layer model"),
        (["--model", str(tmp / "nowhere.gguf")], "GGUF file not found"),
        (["--model", str(junk)], "unreadable GGUF"),
        (["--positions", "b", "--responses", str(resp)], "unknown persona 'nobody'"),
    ]


def test_bad_input_matrix(default_source, tmp_path):
    runner = CliRunner()
    for i, (args, message) in enumerate(_bad_inputs(tmp_path, default_source)):
        out = tmp_path / f"out{i}"
        res = runner.invoke(main, ["extract", "--limit-personas", "2", "--limit-questions", "2",
                                   "--out", str(out), *args])
        errors = [x for x in res.output.splitlines() if x.startswith("error:")]
        assert res.exit_code == 2, (args, res.output[-500:])
        assert len(errors) == 1 and message in errors[0], (args, errors)
        assert not (out / "manifest.json").exists(), args


def test_pt_import_uses_weights_only(tmp_path):
    from tlpersona.cache.seed_layout import read_seed

    (tmp_path / "method_a").mkdir()
    torch.save({"r": torch.zeros(2, 3), "s": torch.ones(2, 3)}, tmp_path / "method_a" / "all_centroids.pt")
    src = read_seed(tmp_path)
    assert src.centroids("a").shape == (2, 2, 3)


def test_missing_and_empty_responses_are_recorded_and_reported(loaded, tmp_path):
    from tlpersona.analyses.compare import CompareConfig, compare
    from tlpersona.data.responses import Response

    personas, questions = builtin_personas()[:4], builtin_questions()[:3]
    eos = loaded.tokenizer.eos_token_id
    g = torch.Generator().manual_seed(0)
    responses = {(p.name, 0, q.id):
                 Response(torch.randint(300, 3000, (5,), generator=g).tolist() + [eos], True)
                 for p in personas for q in questions}
    responses[(personas[1].name, 0, questions[0].id)] = Response([eos], True)  # empty generation
    del responses[(personas[1].name, 0, questions[2].id)]  # engine failure: no response at all
    cfg = ExtractConfig(parse_positions("last,response_mean"), [3, 29], batch_size=4, progress=False)
    st = open_store(extract_to_store(loaded, cfg, personas, questions, tmp_path / "s", responses))
    valid = st.valid("response_mean")
    assert valid[1].tolist() == [False, True, False] and bool(valid[[0, 2, 3]].all())
    assert bool(st.valid("last").all())  # recipes that need no response keep every row
    pq = st.per_question("response_mean")[1].float()
    torch.testing.assert_close(st.centroids("response_mean")[1], pq[1], atol=0.05, rtol=1e-3)
    res = compare(st, CompareConfig(n_perm=9, n_splits=2))
    assert res["missing_rows"] == {"response_mean": {personas[1].name: 2}}


@pytest.mark.parametrize("field", ["model_identity", "template_hash", "prompt_index", "positions",
                                   "questions", "dtype"])
def test_resume_with_other_provenance_is_refused(loaded, tmp_path, field):
    import copy
    import dataclasses

    personas, questions = builtin_personas()[:2], builtin_questions()[:2]
    cfg = ExtractConfig(parse_positions("last"), [3], batch_size=4, progress=False)
    out = tmp_path / "s"
    extract_to_store(loaded, cfg, personas, questions, out)
    model, qs = loaded, questions
    if field == "model_identity":
        model = dataclasses.replace(loaded, info=dataclasses.replace(loaded.info, identity="other"))
    elif field == "template_hash":
        tok = copy.deepcopy(loaded.tokenizer)
        tok.chat_template = tok.chat_template + " "
        model = dataclasses.replace(loaded, tokenizer=tok)
    elif field == "prompt_index":
        cfg = dataclasses.replace(cfg, prompt_index=1)
    elif field == "positions":
        cfg = dataclasses.replace(cfg, positions=parse_positions("last,sys_end"))
    elif field == "questions":
        qs = builtin_questions()[1:3]
    elif field == "dtype":
        model = dataclasses.replace(loaded, dtype=torch.float16)
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(TlpersonaError, match=f"different .*{field}"):
        extract_to_store(model, cfg, personas, qs, out)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing overwritten
    # --force-new starts a new store instead
    extract_to_store(model, cfg, personas, qs, out, force_new=True)
    assert open_store(out).provenance[field] != "" and verify_store(out) == []


def test_torchrun_two_ranks_equal_one_process(default_source, tmp_path):
    """torchrun with 2 CPU ranks (gloo): personas and responses split by rank, rank 0 finishes
    the store; bit-identical to a single process (one thread each, so GEMMs match)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_cli(*ARGS, "--out", str(single)), check=True, capture_output=True, env=env)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(29500 + os.getpid() % 1000), "-m", "tlpersona",
                          *ARGS, "--out", str(multi)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(rank 0 of 2)" in res.stderr and "(rank 1 of 2)" in res.stderr
    _same_store(multi, single)
    lines = lambda p: sorted((p / "responses.jsonl").read_text().splitlines())  # noqa: E731
    assert lines(multi) == lines(single)
    assert not list(multi.glob("responses.rank*"))
