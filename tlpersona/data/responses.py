"""Responses: the JSONL interchange file that generation writes and extraction reads.

Each line: ``{"persona", "prompt_index", "question_id", "response_ids", "finished", "text",
"prompt_sha"}``, after one header line (:mod:`tlpersona.response_provenance`).
``response_ids`` are exactly the generated ids (the end-of-turn token included when the model
emitted it, ``finished`` true); extraction appends them to the prompt ids and never re-tokenises
the text. Any engine may write this file (the header and ``prompt_sha`` are optional there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tlpersona.errors import TlpersonaError
from tlpersona.files import atomic_write_bytes
from tlpersona.response_provenance import is_header
from tlpersona.safety import jsonl_lines, read_text

Key = tuple[str, int, str]  # persona, prompt index, question id

@dataclass
class Response:
    ids: list[int]
    finished: bool
    prompt_sha: str | None = None  # hash of the prompt ids it continues (None: made elsewhere)

    def content_len(self, include_eot: bool) -> int:
        """Number of response tokens that count as content."""
        return len(self.ids) if (include_eot or not self.finished) else len(self.ids) - 1


def rank_files(path: Path) -> list[Path]:
    """Per-rank files that a torchrun generation writes beside ``path`` until they are merged."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def read_responses(path: str | Path) -> dict[Key, Response]:
    """Read a responses JSONL (and any unmerged per-rank files beside it); a torn last line
    (killed writer) is ignored."""
    p = Path(path)
    out: dict[Key, Response] = {}
    for rank_file in rank_files(p):
        out.update(_read_one(rank_file))
    out.update(_read_one(p))
    return out


def _read_one(p: Path) -> dict[Key, Response]:
    out: dict[Key, Response] = {}
    if not p.exists() and not p.is_symlink():
        return out
    lines = jsonl_lines(read_text(p, "responses JSONL file"))
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if is_header(row):
                continue
            key = (str(row["persona"]), int(row["prompt_index"]), str(row["question_id"]))
            out[key] = Response(_token_ids(row["response_ids"]), _flag(row["finished"]),
                                row.get("prompt_sha"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if lineno >= len(lines) - 1:  # the last line may be half-written
                break
            raise TlpersonaError(f"{p}:{lineno}: bad response line ({exc})") from None
    return out


def _token_ids(value: object) -> list[int]:
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise ValueError("response_ids must be a list of integers")
    return list(value)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"finished must be true or false, not {value!r}")
    return value


def merge_rank_files(main: Path) -> None:
    """Fold the per-rank files into ``main`` (one atomic rewrite), then remove them."""
    parts = rank_files(main)
    if not parts:
        return
    for p in [main, *parts]:
        drop_torn_tail(p)
    # One header (each rank file starts with the same one), then every response line.
    lines = [line + b"\n" for p in [main, *parts] if p.exists()
             for line in p.read_bytes().split(b"\n") if line]
    heads = [line for line in lines if line.startswith(b'{"tlpersona_responses"')]
    body = [line for line in lines if not line.startswith(b'{"tlpersona_responses"')]
    atomic_write_bytes(main, b"".join(heads[:1] + body))
    for p in parts:
        p.unlink()


def drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line left by a killed run, so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)
