"""Checks that keep a user's files safe: names that become file names, paths that must stay
inside a directory, output locations, and input files read as text.

Every check raises :class:`TlpersonaError` with one line naming the problem, before anything is
written.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from tlpersona.errors import TlpersonaError

#: Longest persona name in UTF-8 bytes: the temporary ``.<name>__per_q.pt.XXXXXXXX`` must fit a
#: 255-byte file name.
MAX_NAME_BYTES = 200
#: Names the seed layout uses for its own files inside a method folder.
RESERVED_NAMES = frozenset({"all_centroids", "metadata"})


def check_persona_names(names: Iterable[object], where: str) -> list[str]:
    """A persona name becomes a file name (``<name>.pt``): it must be a non-empty one-line
    string without path separators, not hidden, not reserved, and unique (also ignoring case,
    for case-insensitive file systems). Returns the names as a list."""
    out: list[str] = []
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise TlpersonaError(f"{where}: persona name {name!r} is empty or not a string")
        bad = _name_problem(name)
        if bad:
            raise TlpersonaError(f"{where}: persona name {_short(name)} {bad}")
        key = unicodedata.normalize("NFC", name).casefold()
        if key in seen:
            raise TlpersonaError(f"{where}: duplicate persona name {_short(name)}"
                                 + ("" if seen[key] == name else f" (same as {seen[key]!r} ignoring case)"))
        seen[key] = name
        out.append(name)
    return out


def _name_problem(name: str) -> str | None:
    if name != name.strip():
        return "has leading or trailing white space"
    if any(c in name for c in "/\\") or name in (".", ".."):
        return "contains a path separator"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "contains a control or line-break character"
    if name.startswith("."):
        return "starts with a dot"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if name in RESERVED_NAMES or name.endswith("__per_q"):
        return "is reserved for the seed layout's own files"
    return None


def _short(name: str) -> str:
    return repr(name if len(name) <= 60 else name[:57] + "...")


def inside(root: Path, path: Path) -> Path:
    """``path`` if it resolves to a location inside ``root`` (symlinks followed), else an error."""
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise TlpersonaError(f"{path} would lie outside {root}; refusing to write it")
    return path


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: Path, option: str = "`out`") -> None:
    """``path`` is (or can become) a directory this process may write into."""
    if path.is_symlink() and not path.exists():
        raise TlpersonaError(f"{option} {path} is a dangling symbolic link")
    if path.exists() and not path.is_dir():
        raise TlpersonaError(f"{option} {path} is a file, not a directory")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise TlpersonaError(f"{option} {path}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise TlpersonaError(f"{option} {path}: {base} is not writable")


def in_store(directory: Path) -> bool:
    """Whether ``directory`` is a store's directory or a folder directly inside one (its parts
    folder, or one a user made there), whose files belong to the store."""
    # a store being written has its parts folder before its manifest
    return ((directory / "manifest.json").exists() or (directory / "parts").is_dir()
            or directory.name == "parts" or (directory.parent / "manifest.json").exists())


def check_analysis_dir(path: Path, option: str = "`out`") -> None:
    """``path`` may receive an analysis's files: a writable directory that is not a store's."""
    check_output_dir(path, option)
    if in_store(path):
        raise TlpersonaError(f"{option} {path} is a store's directory; write the analysis elsewhere")


def check_output_file(path: Path, option: str = "`out`") -> None:
    """``path`` is (or can become) a regular file this process may write."""
    if path.exists() and not path.is_file():
        raise TlpersonaError(f"{option} {path} is not a regular file")
    if path.exists() and not os.access(path, os.W_OK):
        raise TlpersonaError(f"{option} {path} is not writable")
    check_output_dir(path.parent, option)


def check_new_file(path: Path, overwrite: bool, option: str = "`out`") -> None:
    """``path`` may receive a file that a one-shot writer makes whole: it is writable, does not
    exist (or ``overwrite`` is given), and does not lie in a store's directory, whose files
    belong to the store."""
    check_output_file(path, option)
    if in_store(path.parent):
        raise TlpersonaError(f"{option} {path} lies inside a store's directory; write it elsewhere")
    if path.exists() and not overwrite:
        raise TlpersonaError(f"{option} {path} exists; not replacing it without `overwrite`")


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


def check_count(value: int | None, option: str, minimum: int) -> None:
    """An integer option that must be at least ``minimum`` (None means its default)."""
    if value is not None and value < minimum:
        raise TlpersonaError(f"{option} must be at least {minimum}, not {value}")


def check_finite_numbers(values: Iterable[float], option: str) -> None:
    for v in values:
        if not math.isfinite(v):
            raise TlpersonaError(f"{option} must be finite numbers, not {v}")
