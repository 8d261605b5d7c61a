"""Checks that keep a user's files safe: names that become file names, paths that must stay
inside a directory, output locations, and the results sets written into them.

Every check raises :class:`TlpersonaError` with one line naming the problem, before anything is
written.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import atomic_write_bytes
from tlpersona.infra.locks import LOCK_NAME
from tlpersona.infra.reading import json_file

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
    # compared as the duplicate check compares: on a case-insensitive file system
    # `All_Centroids.pt` is `all_centroids.pt`
    key = unicodedata.normalize("NFC", name).casefold()
    if key in RESERVED_NAMES or key.endswith("__per_q"):
        return "is reserved for the seed layout's own files (ignoring case)"
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
    """Whether ``directory`` is a store's directory or lies anywhere inside one (its parts
    folder, or folders a user made there), whose files belong to the store."""
    # a store being written has its parts folder before its manifest
    if ((directory / "manifest.json").exists() or (directory / "parts").is_dir()
            or directory.name == "parts" or (directory.parent / "manifest.json").exists()):
        return True
    # further up only a store's own marks count: a `manifest.json` of another format or a
    # `parts` folder of a user's project far above `out` says nothing
    return any(_is_store_manifest(d / "manifest.json")
               or ((d / "parts").is_dir() and (d / LOCK_NAME).is_file())
               for d in directory.resolve().parents)


def _is_store_manifest(path: Path) -> bool:
    data = json_file(path)
    return isinstance(data, dict) and str(data.get("format", "")).startswith("tlpersona-store/")


def check_analysis_dir(path: Path, option: str = "`out`") -> None:
    """``path`` may receive an analysis's files: a writable directory that is not a store's."""
    check_output_dir(path, option)
    if in_store(path):
        raise TlpersonaError(f"{option} {path} is a store's directory; write the analysis elsewhere")


#: The file that marks a directory as one results set that tlpersona wrote, listing its files.
RESULTS_MARK = ".tlpersona-results.json"


@dataclass(frozen=True)
class ResultsMark:
    """What :data:`RESULTS_MARK` holds: which analysis wrote the set, and every path in it
    (files and folders, relative, ``/``-separated)."""

    analysis: str
    files: list[str]


#: Files that file browsers and notebooks drop into any folder they show: not a user's data
OS_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints"})


def _litter(name: str) -> bool:
    """A name no user wrote: a file browser's or notebook's, or a results set being written."""
    return name in OS_LITTER or name.startswith("._") or ".tlpersona-partial-" in name


def _entries(root: Path) -> set[str]:
    """Every path under ``root`` (links not followed), but the lock, the mark and litter."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [n for n in dirnames if not _litter(n)]
        rel = Path(dirpath).relative_to(root)
        out.update((rel / n).as_posix() for n in (*dirnames, *filenames) if not _litter(n))
    return out - {LOCK_NAME, RESULTS_MARK}


def mark_results(directory: Path, analysis: str) -> None:
    """Write the mark of a finished results set into ``directory`` (its last file)."""
    mark = {"tlpersona_results": 1, "analysis": analysis, "files": sorted(_entries(directory))}
    atomic_write_bytes(directory / RESULTS_MARK, json.dumps(mark, indent=1).encode())


def read_results_mark(directory: Path) -> ResultsMark | None:
    """The mark of the results set in ``directory``; None where there is none or it is not
    tlpersona's."""
    data = json_file(directory / RESULTS_MARK)
    if not isinstance(data, dict) or data.get("tlpersona_results") != 1:
        return None
    files, analysis = data.get("files"), data.get("analysis")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return ResultsMark(str(analysis), files)


def check_results_dir(path: Path, overwrite: bool, option: str = "`out`") -> None:
    """``path`` may receive a results set: an analysis directory (:func:`check_analysis_dir`)
    that is new or empty, or holds only an earlier results set that tlpersona wrote there,
    replaced only with ``overwrite``. Files tlpersona did not write are never replaced, with
    or without ``overwrite``."""
    check_analysis_dir(path, option)
    if not path.is_dir():
        return
    present = _entries(path)
    mark = read_results_mark(path)
    if mark is None:
        if present:
            raise TlpersonaError(f"{option} {path} holds files that tlpersona did not write there "
                                 f"(e.g. {min(present)}); write the results into a new or empty "
                                 "directory")
        return
    foreign = present - set(mark.files)
    if foreign:
        raise TlpersonaError(f"{option} {path} holds {min(foreign)}, which is not part of the "
                             f"results tlpersona wrote there; move it, or write elsewhere")
    if not overwrite:
        raise TlpersonaError(f"{option} {path} holds earlier {mark.analysis} results; give "
                             "`overwrite` to replace them")


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

