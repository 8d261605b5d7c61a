"""Reading the files a user gives: UTF-8 text from regular files only, JSONL lines, JSON that
refuses duplicate keys, and a JSON file's value or None where a file may be missing or another
program's.

A file that must be read and cannot be raises :class:`TlpersonaError` with one line naming the
path.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

from tlpersona.errors import TlpersonaError


def json_file(path: Path) -> object | None:
    """The JSON value in ``path``; None where it is not a readable JSON file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def check_regular_file(path: Path) -> Path:
    """``path`` if it is a regular file (links followed): a FIFO or device would block or
    never end when opened."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TlpersonaError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise TlpersonaError(f"{path}: not a regular file")
    return path


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file's content; a directory, a missing, unreadable or non-UTF-8 file is one
    line naming the path."""
    if path.is_dir():
        raise TlpersonaError(f"{path}: is a directory, expected a {what}")
    if not path.exists():
        raise TlpersonaError(f"{path}: file not found")
    if not path.is_file():
        raise TlpersonaError(f"{path}: not a regular file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TlpersonaError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise TlpersonaError(f"{path}: cannot read ({exc.strerror or exc})") from None


def jsonl_lines(text: str) -> list[str]:
    """Lines of a JSONL text. Only ``\\n`` ends a line: U+2028, U+0085 and the like may appear
    inside JSON strings (``str.splitlines`` would cut them)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def strict_json(text: str) -> object:
    """``json.loads`` that refuses duplicate keys in an object (they would silently merge)."""

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    return json.loads(text, object_pairs_hook=pairs)

