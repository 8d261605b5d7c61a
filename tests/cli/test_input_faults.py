"""Bad input and provenance on the input side of extraction and generation: responses files
from other engines, stale responses, full disks while generating, outputs inside a store,
refusals under torchrun, and the API taking a loaded model.

Each bad input is one error line naming the file, the line and the field, exit code 2, and
nothing written; each accepted irregularity is a documented rule checked here.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import SMALL
from factories import fails as _fails
from factories import run as _run

import tlpersona as tlp
from tlpersona.data import Question, builtin_personas, builtin_questions
from tlpersona.data.provenance import check_compatible
from tlpersona.data.provenance import header as response_header
from tlpersona.data.responses import (
    Response,
    drop_torn_tail,
    merge_rank_files,
    read_responses,
    read_responses_file,
)
from tlpersona.errors import TlpersonaError

PERSONAS = [p.name for p in builtin_personas()[:2]]
QIDS = [q.id for q in builtin_questions()[:2]]


def _row(persona: str = PERSONAS[0], qid: str = QIDS[0], ids: list | None = None,
         finished: bool = False, **extra: object) -> dict:
    return {"persona": persona, "prompt_index": 0, "question_id": qid,
            "response_ids": [400, 500] if ids is None else ids, "finished": finished, **extra}


def _write(path: Path, rows: list[dict | str], newline_at_end: bool = True) -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows)
    path.write_text(text + ("\n" if newline_at_end else ""))
    return path


def _full_file(eos: int = 2) -> list[dict]:
    """A response (with content) for every prompt of the SMALL run."""
    return [_row(p, q, [400 + i, 500, eos], True) for i, p in enumerate(PERSONAS) for q in QIDS]


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: a bad input must be refused before one."""
    import tlpersona.api.extraction as api

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(api, "load_model", refuse)
    monkeypatch.setattr(api, "load_hf", refuse)


# --- 1. responses files from other engines: every line checked, field by field ---------------

GOOD = _row(PERSONAS[1], QIDS[1])


@pytest.mark.parametrize(("bad", "message"), [
    (_row(ids=[1, "x"]), "field response_ids item 1 is 'x', not a token id"),
    (_row(ids="1 2"), "field response_ids must be a list of token ids"),
    ({**_row(), "prompt_index": "0"}, "field prompt_index must be an integer ≥ 0, not '0'"),
    ({**_row(), "prompt_index": 0.5}, "field prompt_index must be an integer ≥ 0, not 0.5"),
    ({**_row(), "prompt_index": True}, "field prompt_index must be an integer ≥ 0, not True"),
    ({**_row(), "prompt_index": -1}, "field prompt_index must be an integer ≥ 0, not -1"),
    ({**_row(), "persona": 7}, "field persona must be a string"),
    ({**_row(), "question_id": None}, "field question_id must be a string"),
    (_row(ids=[], finished=True), "field response_ids is empty but finished is true"),
    ({k: v for k, v in _row().items() if k != "finished"}, "no field finished"),
    ([1, 2], "expected a JSON object, not list"),
    (json.dumps(response_header("m", "t", "float32", 8)), "a header line inside the file"),
])
def test_a_bad_last_line_is_named_with_its_line_and_field(tmp_path, bad, message):
    """The bad line is the last complete line: the reader used to take any error there for a
    torn line and drop it silently."""
    f = _write(tmp_path / "r.jsonl", [json.dumps(response_header("m", "t", "float32", 8)), GOOD, bad])
    with pytest.raises(TlpersonaError) as err:
        read_responses(f)
    assert str(err.value).startswith(f"{f}:3: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_torn_last_line_is_refused_as_input_and_ignored_on_resume(tmp_path):
    f = _write(tmp_path / "r.jsonl", [GOOD, '{"persona": "x", "prompt_ind'], newline_at_end=False)
    with pytest.raises(TlpersonaError, match=r"r.jsonl:2: torn last line"):
        read_responses(f)
    assert list(read_responses(f, resume=True)) == [(PERSONAS[1], 0, QIDS[1])]
    # a complete last line without its newline is a response, for every reader
    _write(f, [GOOD, _row()], newline_at_end=False)
    assert len(read_responses(f)) == 2


def test_a_last_line_missing_only_its_newline_survives_the_resume_cut(tmp_path):
    """The writer died between a line and its newline: the resuming writer completes the line
    instead of cutting a response that its reader had counted (then never generated again)."""
    f = _write(tmp_path / "r.jsonl", [GOOD, _row()], newline_at_end=False)
    drop_torn_tail(f)
    assert f.read_text().endswith("\n") and len(read_responses(f)) == 2
    _write(f, [GOOD, '{"persona": "x"'], newline_at_end=False)
    drop_torn_tail(f)
    assert f.read_text() == json.dumps(GOOD) + "\n"


def test_duplicate_keys_are_refused_unless_identical(tmp_path):
    f = _write(tmp_path / "r.jsonl", [_row(), GOOD, _row(ids=[401, 500])])
    with pytest.raises(TlpersonaError, match=r"r.jsonl:3: a second, different response for "
                                             rf"persona '{PERSONAS[0]}', prompt_index 0, "
                                             rf"question_id '{QIDS[0]}' \(first at .*r.jsonl:1\)"):
        read_responses(f)
    _write(f, [_row(), GOOD, _row()])  # the same response twice: read once
    got = read_responses_file(f)
    assert len(got.responses) == 2 and got.where[(PERSONAS[0], 0, QIDS[0])].endswith("r.jsonl:1")


def test_a_merge_interrupted_before_removing_rank_files_merges_again_once(tmp_path):
    head = json.dumps(response_header("m", "t", "float32", 8))
    main_file = tmp_path / "responses.jsonl"
    _write(tmp_path / "responses.rank0.jsonl", [head, _row()])
    _write(tmp_path / "responses.rank1.jsonl", [head, GOOD])
    # killed after the merged file was renamed into place, before the rank files were removed
    _write(main_file, [head, _row(), GOOD])
    assert len(read_responses(main_file, resume=True)) == 2
    merge_rank_files(main_file)
    lines = main_file.read_text().splitlines()
    assert lines == [head, json.dumps(_row()), json.dumps(GOOD)]
    assert not list(tmp_path.glob("responses.rank*"))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("dtype", "int8", "header field dtype is 'int8'"),
    ("max_new_tokens", "999", "header field max_new_tokens must be an integer ≥ 1, not '999'"),
    ("tlpersona_responses", 2, "header of format version 2"),
    ("decoding", "sampled", "header field decoding is 'sampled'"),
])
def test_a_malformed_header_is_refused(tmp_path, field, value, message):
    head = {**response_header("m", "t", "float32", 8), field: value}
    f = _write(tmp_path / "r.jsonl", [json.dumps(head), GOOD])
    with pytest.raises(TlpersonaError, match=f"r.jsonl:1: {message}"):
        read_responses(f)


def test_a_header_must_fit_the_run_that_reads_the_file(tmp_path):
    """max_new_tokens must match where the run sets it, and bound every response; another
    dtype is read (the ids do not depend on the dtype they are extracted in: an fp32 reference
    of bf16 responses); a header-less file (made elsewhere) is read as it is."""
    run = response_header("m", "t", "float32", 48)
    f = tmp_path / "r.jsonl"
    lengths = {f"{f}:2": 2, f"{f}:3": 7}
    check_compatible(f, {**run, "dtype": "bfloat16"}, run, False, lengths)
    with pytest.raises(TlpersonaError, match=r"different model_identity \('n', this run 'm'\)"):
        check_compatible(f, {**run, "model_identity": "n"}, run, False, lengths)
    claims = {**run, "max_new_tokens": 999}
    check_compatible(f, claims, run, False, lengths)  # the run did not ask for a length
    with pytest.raises(TlpersonaError, match=r"different max_new_tokens \(999, this run 48\)"):
        check_compatible(f, claims, run, True, lengths)
    with pytest.raises(TlpersonaError, match=r"r.jsonl:3: field response_ids holds 7 tokens, "
                                             "more than the header's max_new_tokens of 5"):
        check_compatible(f, {**run, "max_new_tokens": 5}, run, False, lengths)
    check_compatible(f, None, run, True, lengths)


@pytest.mark.model
def test_a_header_of_another_template_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from tlpersona.models.loading import resolve

    _, identity = resolve("default")
    head = response_header(identity, "another-template", "bfloat16", 8)
    f = _write(tmp_path / "r.jsonl", [json.dumps(head), *_full_file()])
    _no_model(monkeypatch)
    _fails("different template_hash ('another-template'", "extract",
           *SMALL, "--positions", "b", "--responses", str(f), "--layers", "3",
           "--out", str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_lines_of_prompts_outside_the_run_are_left_out_and_near_misses_refused(tmp_path):
    """A file made for the whole study, read by a run of part of it: lines of other questions
    and phrasings are left out (and counted); a question id differing only in case is not."""
    from tlpersona.data.responses import read_responses_file
    from tlpersona.extraction.preflight import check_response_keys

    rows = _full_file()
    rows.append({**rows[0], "question_id": "another"})
    rows.append({**rows[0], "prompt_index": 2})
    given = read_responses_file(_write(tmp_path / "r.jsonl", rows))
    ps, qs = builtin_personas()[:2], builtin_questions()[:2]
    outside = check_response_keys(given.where, ps, qs, 0)
    assert sorted(outside) == sorted([(rows[0]["persona"], 0, "another"),
                                      (rows[0]["persona"], 2, rows[0]["question_id"])])
    near = tmp_path / "near.jsonl"
    _write(near, [*_full_file(), {**_full_file()[0], "question_id": f" {QIDS[0]} "}])
    with pytest.raises(TlpersonaError, match=rf"near.jsonl:\d+: field question_id ' {QIDS[0]} ' "
                                             rf"is not a question of this run; did you mean '{QIDS[0]}'"):
        check_response_keys(read_responses_file(near).where, ps, qs, 0)


@pytest.mark.model
def test_responses_matching_no_prompt_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    """An upper-cased question id used to be read as a missing response: the run failed only
    at its persona's group, after the model loaded and a manifest was written."""
    rows = _full_file()
    rows[1]["question_id"] = rows[1]["question_id"].upper()
    f = _write(tmp_path / "r.jsonl", rows)
    _no_model(monkeypatch)
    out = tmp_path / "s"
    _fails(f"r.jsonl:2: field question_id '{QIDS[1].upper()}' is not a question of this run",
           "extract", *SMALL, "--positions", "b", "--responses", str(f), "--layers", "3",
           "--out", str(out))
    assert not out.exists()


@pytest.mark.model
def test_missing_prompts_are_marked_invalid_and_counted(tmp_path, capsys):
    """The documented rule for a prompt without a line: accepted, its rows invalid, and said."""
    rows = _full_file(eos=builtin_eos())
    del rows[3]  # the second persona's second question
    f = _write(tmp_path / "r.jsonl", rows)
    store = tlp.extract("default", builtin_personas()[:2], builtin_questions()[:2],
                        positions=["last", "response_mean"], layers=[3], out=tmp_path / "s",
                        responses=f, device="cpu", progress=False)
    assert store.valid("response_mean").tolist() == [[True, True], [True, False]]
    assert bool(store.valid("last").all())
    assert "1 of 4 prompts have no response line (first: persona " \
           f"'{PERSONAS[1]}', question '{QIDS[1]}')" in capsys.readouterr().err


def builtin_eos() -> int:
    from tlpersona.models.loading import load_tokenizer, resolve

    return int(load_tokenizer(resolve("default")[0]).eos_token_id)


@pytest.mark.model
def test_a_persona_without_any_response_stops_the_run_before_the_first_write(loaded, tmp_path):
    """Found at its group, mid-run, it used to leave the earlier groups' parts behind."""
    from tlpersona.chat.positions import parse_positions
    from tlpersona.extraction import ExtractConfig, extract_to_store

    personas, questions = builtin_personas()[:4], builtin_questions()[:2]
    eos = loaded.tokenizer.eos_token_id
    responses = {(p.name, 0, q.id): Response([400, 500, eos], True)
                 for p in personas for q in questions}
    for q in questions:  # the third persona: one empty response, one missing
        del responses[(personas[2].name, 0, q.id)]
    responses[(personas[2].name, 0, questions[0].id)] = Response([eos], True)
    cfg = ExtractConfig(parse_positions("last,response_mean"), [3], batch_size=4, progress=False)
    out = tmp_path / "s"
    with pytest.raises(TlpersonaError, match=f"persona '{personas[2].name}' has no response with "
                                             "content for any question, so response_mean"):
        extract_to_store(loaded, cfg, personas, questions, out, responses)
    assert not out.exists()


# --- 2. an empty finished response ------------------------------------------------------------

@pytest.mark.model
def test_an_empty_finished_response_is_one_line(tokenizer, tmp_path, monkeypatch):
    from tlpersona.chat.positions import parse_positions
    from tlpersona.extraction.preflight import check_prompts, check_responses

    pos = parse_positions("response_mean_seed,resp_start")
    persona, q = builtin_personas()[0], builtin_questions()[0]
    checked = check_prompts(tokenizer, pos, [persona], [q], 0)
    with pytest.raises(TlpersonaError, match="a finished response without its end-of-turn token"):
        check_responses(checked, pos, {(persona.name, 0, q.id): Response([], True)}, 50000,
                        False, "r")
    rows = _full_file(eos=int(tokenizer.eos_token_id))
    rows[2]["response_ids"] = []
    f = _write(tmp_path / "r.jsonl", rows)
    _no_model(monkeypatch)
    _fails("r.jsonl:3: field response_ids is empty but finished is true", "extract", *SMALL,
           "--positions", "response_mean_seed,resp_start", "--responses", str(f), "--layers", "3",
           "--out", str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


# --- 6. a --responses file that does not exist ------------------------------------------------

def test_a_missing_responses_file_is_an_error_even_when_unused(tmp_path):
    _fails("responses file not found", "extract", *SMALL, "--positions", "last",
           "--responses", str(tmp_path / "nonexistent.jsonl"), "--out", str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


# --- 3. a full disk while generating ----------------------------------------------------------

GEN = ["generate", *SMALL, "--max-new-tokens", "4", "--batch-size", "2", "--decoder", "hf"]


@pytest.mark.model
def test_a_full_disk_while_generating_is_one_line_and_resumes(tmp_path, monkeypatch):
    import tlpersona.data.responses as responses_mod

    ref = tmp_path / "ref.jsonl"
    code, _, output = _run(*GEN, "--out", str(ref))
    assert code == 0, output[-1500:]
    real = responses_mod._write
    calls = []

    def full_disk(f, data):
        calls.append(len(data))
        if len(calls) == 3:  # header, first batch, then the second batch hits the full disk
            f.write(data[: len(data) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(responses_mod, "_write", full_disk)
    out = tmp_path / "r.jsonl"
    _fails("No space left on device: free space and rerun to resume", *GEN, "--out", str(out))
    # the first batch is intact, the half-written line is gone
    assert out.read_text().endswith("\n") and len(read_responses(out)) == 2
    monkeypatch.setattr(responses_mod, "_write", real)
    code, _, output = _run(*GEN, "--out", str(out))
    assert code == 0, output[-1500:]
    assert out.read_text().splitlines()[0] == ref.read_text().splitlines()[0]
    assert sorted(out.read_text().splitlines()) == sorted(ref.read_text().splitlines())


# --- 29.12: generate into a store's responses file --------------------------------------------

@pytest.mark.model
def test_generate_into_a_stores_responses_file_is_refused(tmp_path):
    store = tmp_path / "s"
    code, _, output = _run("extract", *SMALL, "--positions", "last,response_mean", "--layers", "3",
                           "--max-new-tokens", "3", "--out", str(store))
    assert code == 0, output[-1500:]
    before = (store / "responses.jsonl").read_bytes()
    _fails("lies inside a store's directory", "generate", "--limit-personas", "3",
           "--limit-questions", "2", "--max-new-tokens", "3", "--out",
           str(store / "responses.jsonl"))
    assert (store / "responses.jsonl").read_bytes() == before


# --- 29.2: the one-pass path and stale responses ---------------------------------------------

@pytest.mark.model
@pytest.mark.parametrize("decoder", ["static", "hf"])
def test_a_reworded_question_is_refused_on_every_decoder(tmp_path, decoder, monkeypatch):
    """Generate into F/responses.jsonl, reword a question, extract into F: the saved response
    continues the old prompt. The one-pass (static decoder) path used to read the new prompt
    with the old answer."""
    personas, questions = builtin_personas()[:2], builtin_questions()[:3]
    out = tmp_path / "F"
    tlp.generate("default", personas, questions[:2], out=out / "responses.jsonl",
                 max_new_tokens=3, device="cpu", decoder="hf", progress=False)
    before = (out / "responses.jsonl").read_bytes()
    reworded = [Question(questions[0].id, questions[0].text + " Answer briefly."), *questions[1:]]
    _no_model(monkeypatch)
    with pytest.raises(TlpersonaError, match=f"question '{questions[0].id}' continues a different "
                                             "prompt"):
        tlp.extract("default", personas, reworded, positions=["response_mean"], layers=[3],
                    out=out, max_new_tokens=3, device="cpu", decoder=decoder, progress=False)
    assert (out / "responses.jsonl").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) in (["responses.jsonl"],
                                                     ["responses.jsonl", "tlpersona.lock"])


# --- 28.4: a loaded model wherever a model is taken -------------------------------------------

@pytest.mark.model
def test_write_prompts_and_generate_take_a_loaded_model(loaded, tmp_path):
    personas, questions = builtin_personas()[:1], builtin_questions()[:2]
    assert tlp.write_prompts(loaded, personas, questions, out=tmp_path / "a.jsonl") == 2
    tlp.write_prompts("default", personas, questions, out=tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    got = tlp.generate(loaded, personas, questions, out=tmp_path / "r.jsonl", max_new_tokens=3,
                       decoder="hf", progress=False)
    want = tlp.generate("default", personas, questions, out=tmp_path / "r2.jsonl",
                        max_new_tokens=3, device="cpu", dtype="fp32", decoder="hf",
                        progress=False)
    assert {k: r.ids for k, r in got.items()} == {k: r.ids for k, r in want.items()}
    head = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert head["model_identity"] == loaded.info.identity and head["dtype"] == "float32"


# --- 29.13: a refusal on rank 0 under torchrun ------------------------------------------------

@pytest.mark.model
def test_a_refusal_on_rank_0_stops_every_rank_with_one_line(tmp_path):
    from tlpersona.infra.locks import exclusive

    out = tmp_path / "s"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with exclusive(out, "`out`"):  # another run holds --out
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", str(30500 + os.getpid() % 1000), "-m", "tlpersona", "extract",
             *SMALL, "--positions", "last", "--layers", "3", "--out", str(out)],
            capture_output=True, text=True, env=env, timeout=300)
    text = res.stdout + res.stderr
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert res.returncode != 0
    assert len(errors) == 2 and all("is in use by PID" in e for e in errors), text[-3000:]
    assert "exitcode  : 2" in text, text[-3000:]
    # No worker dies in a collective that rank 0 left: the one traceback is the launcher's own
    # report that its workers failed (torchrun raises ChildFailedError for any exit code but 0).
    workers = text.split("Traceback (most recent call last)")
    assert len(workers) == 2 and "torch/distributed/run.py" in workers[1], text[-3000:]
    assert not any(w in workers[0] for w in ("gloo", "Connection closed", "Error")), text[-3000:]
