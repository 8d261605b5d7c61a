"""Responses: the JSONL interchange file that generation writes and extraction reads.

Each line: ``{"persona", "prompt_index", "question_id", "response_ids", "finished", "text",
"prompt_sha"}``, after one header line (:mod:`tlpersona.data.provenance`).
``response_ids`` are exactly the generated ids (the end-of-turn token included when the model
emitted it, ``finished`` true); extraction appends them to the prompt ids and never re-tokenises
the text. Any engine may write this file (the header and ``prompt_sha`` are optional there).

What a reader accepts, line by line (anything else is one error naming the file, the line and
the field):

* ``persona`` a string; ``prompt_index`` a JSON integer ≥ 0 (not ``"0"``, ``0.5`` or ``true``);
  ``question_id`` a string, or an integer read as its decimal string (question ids of a
  questions file are strings of what its ``id`` held); ``response_ids`` a list of integers;
  ``finished`` true or false, and a finished response holds at least its end token; ``prompt_sha``
  absent, null or a string. Other keys (``text``) are ignored.
* The header, when there is one, is the first line; a header anywhere else (two files joined)
  is refused.
* One key (persona, prompt index, question id) twice with the same tokens is read once (a merge
  of per-rank files interrupted before it removed them leaves exactly that); twice with
  different tokens is refused, naming both lines: the reader never chooses between them.
* A last line without its newline that is not valid JSON is torn (its writer was killed). The
  resuming writer of a file (``resume=True``) ignores it and cuts it before appending; as the
  input of an extraction it is refused, since the file is then not finished.

A prompt with no line at all is not an error here: extraction marks its rows invalid
(``Store.valid``) and says how many there are (:mod:`tlpersona.extraction.preflight`).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlpersona.data.provenance import check_header, is_header
from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import atomic_write_bytes
from tlpersona.infra.reading import jsonl_lines, read_text

Key = tuple[str, int, str]  # persona, prompt index, question id

@dataclass
class Response:
    ids: list[int]
    finished: bool
    prompt_sha: str | None = None  # hash of the prompt ids it continues (None: made elsewhere)

    def content_len(self, include_eot: bool) -> int:
        """Number of response tokens that count as content."""
        return len(self.ids) if (include_eot or not self.finished) else len(self.ids) - 1


@dataclass
class ResponsesFile:
    """A responses file as read: the responses by key, where each was read (``path:line``) and
    the header (None: a file made elsewhere)."""

    responses: dict[Key, Response] = field(default_factory=dict)
    where: dict[Key, str] = field(default_factory=dict)
    header: dict[str, Any] | None = None


def rank_files(path: Path) -> list[Path]:
    """Per-rank files that a torchrun generation writes beside ``path`` until they are merged."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def read_responses(path: str | Path, resume: bool = False) -> dict[Key, Response]:
    """Read a responses JSONL (and any unmerged per-rank files beside it) by the rules of the
    module doc; ``resume``: the file is one this process continues, whose torn last line is
    ignored."""
    return read_responses_file(path, resume).responses


def read_responses_file(path: str | Path, resume: bool = False) -> ResponsesFile:
    """:func:`read_responses` with where each response was read and the header."""
    p = Path(path)
    out = ResponsesFile()
    for f in [*rank_files(p), p]:
        _read_one(f, resume, out)
    return out


def _read_one(p: Path, resume: bool, out: ResponsesFile) -> None:
    if not p.exists() and not p.is_symlink():
        return
    text = read_text(p, "responses JSONL file")
    lines = jsonl_lines(text)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):  # no newline after it: cut off mid-write
                if resume:
                    return
                raise TlpersonaError(f"{where}: torn last line (no newline, not valid JSON); "
                                     "its writer was killed: rerun `generate` to finish the file, "
                                     "or remove the line") from None
            raise TlpersonaError(f"{where}: invalid JSON ({exc})") from None
        if is_header(row):
            if lineno != 1:
                raise TlpersonaError(f"{where}: a header line inside the file (files joined?); "
                                     "the header belongs on line 1 only")
            check_header(row, where)
            if out.header is not None and row != out.header:
                raise TlpersonaError(f"{where}: the header differs from that of the other "
                                     "per-rank files of this run")
            out.header = row
            continue
        key, resp = _parse(row, where)
        _add(out, key, resp, where)


def _add(out: ResponsesFile, key: Key, resp: Response, where: str) -> None:
    old = out.responses.get(key)
    if old is not None:
        if (old.ids, old.finished, old.prompt_sha) != (resp.ids, resp.finished, resp.prompt_sha):
            raise TlpersonaError(
                f"{where}: a second, different response for persona {key[0]!r}, prompt_index "
                f"{key[1]}, question_id {key[2]!r} (first at {out.where[key]}); keep one of them")
        return
    out.responses[key] = resp
    out.where[key] = where


def _parse(row: object, where: str) -> tuple[Key, Response]:
    """One response line's key and response; errors name the field."""
    if not isinstance(row, dict):
        raise TlpersonaError(f"{where}: expected a JSON object, not {type(row).__name__}")
    for name in ("persona", "prompt_index", "question_id", "response_ids", "finished"):
        if name not in row:
            raise TlpersonaError(f"{where}: no field {name}")
    persona, pidx, qid = row["persona"], row["prompt_index"], row["question_id"]
    if not isinstance(persona, str):
        raise TlpersonaError(f"{where}: field persona must be a string, not {persona!r}")
    if type(pidx) is not int or pidx < 0:
        raise TlpersonaError(f"{where}: field prompt_index must be an integer ≥ 0, not {pidx!r}")
    if type(qid) is int:
        qid = str(qid)
    if not isinstance(qid, str):
        raise TlpersonaError(f"{where}: field question_id must be a string, not {qid!r}")
    ids = row["response_ids"]
    if not isinstance(ids, list):
        raise TlpersonaError(f"{where}: field response_ids must be a list of token ids, "
                             f"not {type(ids).__name__}")
    bad = next((i for i, t in enumerate(ids) if type(t) is not int), None)
    if bad is not None:
        raise TlpersonaError(f"{where}: field response_ids item {bad} is {ids[bad]!r}, "
                             "not a token id (an integer)")
    finished = row["finished"]
    if not isinstance(finished, bool):
        raise TlpersonaError(f"{where}: field finished must be true or false, not {finished!r}")
    if finished and not ids:
        raise TlpersonaError(f"{where}: field response_ids is empty but finished is true; a "
                             "finished response holds its end-of-turn token")
    sha = row.get("prompt_sha")
    if sha is not None and not isinstance(sha, str):
        raise TlpersonaError(f"{where}: field prompt_sha must be a string, not {sha!r}")
    return (persona, pidx, qid), Response(list(ids), finished, sha)


def response_line(key: Key, resp: Response, text: str) -> str:
    """One response as the JSONL line that generation writes."""
    return json.dumps({"persona": key[0], "prompt_index": key[1], "question_id": key[2],
                       "response_ids": resp.ids, "finished": resp.finished, "text": text,
                       "prompt_sha": resp.prompt_sha}) + "\n"


def append_lines(path: Path, lines: list[str]) -> None:
    """Append ``lines`` to ``path`` and fsync. A failed write (disk full, quota) is one line;
    the lines written before it stay, and a line it cut is removed where the disk allows (else
    the next run cuts it), so the file resumes."""
    try:
        with path.open("ab") as f:
            _write(f, "".join(lines).encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        try:
            drop_torn_tail(path)
        except OSError:
            pass
        hint = (": free space and rerun to resume (the responses written so far are kept)"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "")
        raise TlpersonaError(f"cannot write {path}: {exc.strerror or exc}{hint}") from None


def _write(f: Any, data: bytes) -> None:
    f.write(data)


def merge_rank_files(main: Path) -> None:
    """Fold the per-rank files into ``main`` (one atomic rewrite), then remove them."""
    parts = rank_files(main)
    if not parts:
        return
    for p in [main, *parts]:
        drop_torn_tail(p)
    # One header (each rank file starts with the same one), then every response line once: a
    # merge killed before it removed the rank files has their lines in ``main`` already.
    lines = [line + b"\n" for p in [main, *parts] if p.exists()
             for line in p.read_bytes().split(b"\n") if line]
    heads = [line for line in lines if line.startswith(b'{"tlpersona_responses"')]
    body = [line for line in lines if not line.startswith(b'{"tlpersona_responses"')]
    atomic_write_bytes(main, b"".join(heads[:1] + list(dict.fromkeys(body))))
    for p in parts:
        p.unlink()


def drop_torn_tail(path: Path) -> None:
    """End a file left by a killed run on a fresh line, so appends start there: a last line
    without its newline is cut when it is not valid JSON, and completed when it is (the writer
    died between the line and its newline; readers count it)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    try:
        json.loads(data[keep:])
    except (json.JSONDecodeError, UnicodeDecodeError):
        with path.open("r+b") as f:
            f.truncate(keep)
        return
    with path.open("ab") as f:
        f.write(b"\n")
