"""Provenance of a responses JSONL, so that responses are never reused for a run they do not fit.

A file that tlpersona writes starts with one header line::

    {"tlpersona_responses": 1, "model_identity": ..., "template_hash": ..., "dtype": ...,
     "max_new_tokens": ..., "decoding": "greedy"}

and every response line carries ``prompt_sha``: a hash of the prompt token ids it continues
(system prompt, question and chat template in one). Reusing a file with another header, or a
response whose prompt is not this run's, is refused naming what differs. A file without a header
(made elsewhere) is accepted with ``--responses`` only; ``OUT/responses.jsonl`` and ``generate
--out`` refuse to touch a file that is not theirs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tlpersona.errors import TlpersonaError

HEADER_KEY = "tlpersona_responses"
VERSION = 1


def header(model_identity: str, template_hash: str, dtype: str, max_new_tokens: int) -> dict[str, Any]:
    """What decides the generated tokens (besides the prompt, hashed per line)."""
    return {HEADER_KEY: VERSION, "model_identity": model_identity, "template_hash": template_hash,
            "dtype": dtype, "max_new_tokens": max_new_tokens, "decoding": "greedy"}


def prompt_sha(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:20]


def is_header(row: object) -> bool:
    return isinstance(row, dict) and HEADER_KEY in row


def read_header(path: Path) -> dict[str, Any] | None:
    """The header of ``path``; None for a missing or empty file, or one without a header."""
    if not path.is_file():
        return None
    with path.open("rb") as f:
        first = f.readline()
    try:
        row = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if is_header(row) else None


def check_ours(path: Path, expected: dict[str, Any] | None, option: str) -> None:
    """``path`` may be appended to by a run with header ``expected``: it is missing, empty, or
    a tlpersona responses file with the same header. Anything else is refused untouched."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise TlpersonaError(f"{option} {path} is not a regular file")
    if not path.exists() or path.stat().st_size == 0:
        return
    found = read_header(path)
    if found is None:
        raise TlpersonaError(f"{path} is not a tlpersona responses file (no header line); not "
                             "touching it: move it away (extract reads a file made elsewhere as "
                             "its `responses`)")
    if expected is None:
        return
    diff = [k for k in expected if k != HEADER_KEY and found.get(k) != expected[k]]
    if found.get(HEADER_KEY) != VERSION:
        diff.insert(0, "format version")
    if diff:
        k = diff[0]
        raise TlpersonaError(
            f"{path} holds responses made with a different {', '.join(diff)}"
            + (f" ({found.get(k)!r}, this run {expected[k]!r})" if k in expected else "")
            + "; use another output or remove the file")


def check_compatible(path: Path, model_identity: str, template_hash: str) -> None:
    """A responses file given with ``--responses`` that names its model must name this one."""
    found = read_header(path)
    if found is None:
        return
    for key, want in (("model_identity", model_identity), ("template_hash", template_hash)):
        if found.get(key) != want:
            raise TlpersonaError(f"{path} holds responses made with a different {key} "
                                 f"({found.get(key)!r}, this model {want!r})")
