"""Provenance of a responses JSONL, so that responses are never reused for a run they do not fit.

A file that tlpersona writes starts with one header line::

    {"tlpersona_responses": 1, "model_identity": ..., "template_hash": ..., "dtype": ...,
     "max_new_tokens": ..., "decoding": "greedy"}

and every response line carries ``prompt_sha``: a hash of the prompt token ids it continues
(system prompt, question and chat template in one). Reusing a file with another header, or a
response whose prompt is not this run's, is refused naming what differs. A file without a header
(made elsewhere) is accepted with ``--responses`` only; ``OUT/responses.jsonl`` and ``generate
--out`` refuse to touch a file that is not theirs.

A file given to extraction (``--responses``) with a header must name this run's model, chat
template and dtype; its ``max_new_tokens`` must equal the run's where the run sets one, and
bound every response in it (a longer response means the header does not describe the file).
Removing the header line turns such a file into one made elsewhere, read without these checks
(each line's ``prompt_sha`` is still checked).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tlpersona.errors import TlpersonaError

HEADER_KEY = "tlpersona_responses"
VERSION = 1
_DTYPES = ("float32", "float16", "bfloat16")


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


def check_header(row: dict[str, Any], where: str) -> None:
    """A header line is well formed: this format version and typed fields (checked when read,
    so that comparisons later never meet a header that cannot describe a file)."""
    if row.get(HEADER_KEY) != VERSION:
        raise TlpersonaError(f"{where}: header of format version {row.get(HEADER_KEY)!r}; this "
                             f"tlpersona reads version {VERSION}")
    for name in ("model_identity", "template_hash"):
        if not isinstance(row.get(name), str):
            raise TlpersonaError(f"{where}: header field {name} must be a string")
    if row.get("dtype") not in _DTYPES:
        raise TlpersonaError(f"{where}: header field dtype is {row.get('dtype')!r}, not one of "
                             f"{', '.join(_DTYPES)}")
    n = row.get("max_new_tokens")
    if type(n) is not int or n < 1:
        raise TlpersonaError(f"{where}: header field max_new_tokens must be an integer ≥ 1, "
                             f"not {n!r}")
    if row.get("decoding") != "greedy":
        raise TlpersonaError(f"{where}: header field decoding is {row.get('decoding')!r}; "
                             "tlpersona reads greedy responses only")


def check_compatible(path: Path, found: dict[str, Any] | None, expected: dict[str, Any],
                     max_new_tokens_given: bool, lengths: dict[str, int]) -> None:
    """A responses file given with ``--responses`` fits this run (module doc): ``found`` is its
    header (None: made elsewhere, nothing to check), ``expected`` this run's header, and
    ``lengths`` each response's token count by where it was read (``path:line``)."""
    if found is None:
        return
    # the dtype they were generated in is not compared: extraction in another dtype (an fp32
    # reference of bf16 responses) reads the same token ids
    keys = ["model_identity", "template_hash"]
    if max_new_tokens_given:
        keys.append("max_new_tokens")
    for key in keys:
        if found.get(key) != expected[key]:
            hint = {"max_new_tokens": "; leave `max_new_tokens` out to read them as they are"
                    }.get(key, "").format(found.get(key))
            raise TlpersonaError(f"{path} holds responses made with a different {key} "
                                 f"({found.get(key)!r}, this run {expected[key]!r}){hint}")
    n = found["max_new_tokens"]
    long = next(((w, k) for w, k in lengths.items() if k > n), None)
    if long is not None:
        raise TlpersonaError(f"{long[0]}: field response_ids holds {long[1]} tokens, more than "
                             f"the header's max_new_tokens of {n}; the header does not describe "
                             "this file")
