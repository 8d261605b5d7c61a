"""Where results are written and read: a results set (one directory, swapped in whole) and a
saved result's file, found by kind."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import replaced_dir
from tlpersona.infra.locks import LOCK_NAME, exclusive
from tlpersona.infra.paths import RESULTS_MARK, check_results_dir, mark_results
from tlpersona.infra.reading import read_text, strict_json

#: (thread, directory) of the results sets this process is writing: a result saved into one
#: (the experiment's sections) joins that set instead of replacing it.
_OPEN_SETS: set[tuple[int, Path]] = set()


@contextmanager
def results_set(out: str | Path, analysis: str, overwrite: bool,
                finish: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """The directory to write one results set into, holding ``out``'s lock: ``out``'s new
    content, which takes ``out``'s place whole when the block ends (a failure or a kill leaves
    the earlier set as it was), marked as ``analysis``'s results. ``out`` must be new, empty or
    hold an earlier set (replaced only with ``overwrite``): see
    :func:`tlpersona.infra.paths.check_results_dir`. Inside a set this thread is writing, that
    set's directory itself. ``finish(stage)`` runs when the block's files are in, before the
    set is marked done, and only where the set is not joined: a page over the whole folder
    (report.html) is drawn once, by whoever writes the set."""
    out = Path(out)
    if (threading.get_ident(), out.resolve()) in _OPEN_SETS:
        yield out
        return
    check_results_dir(out, overwrite)
    with exclusive(out, "`out`", wait=True):
        check_results_dir(out, overwrite)  # again: the run it waited for may have written there
        with replaced_dir(out, carry=[LOCK_NAME], last=RESULTS_MARK) as stage:
            key = (threading.get_ident(), stage.resolve())
            _OPEN_SETS.add(key)
            try:
                yield stage
            finally:
                _OPEN_SETS.discard(key)
            if finish is not None:
                finish(stage)
            mark_results(stage, analysis)


#: result kind -> (its file's name, the class that loads it, top-level keys only that kind has)
KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "compare": ("results.json", "CompareResult", ("cells", "overall")),
    "subspace": ("subspace.json", "SubspaceResult", ("layers", "null", "unit_norm")),
    "projection": ("projection.json", "ProjectionResult", ("stored", "items", "axis")),
    "patch": ("patch.json", "PatchResult", ("patching",)),
    "steering": ("steering.json", "SteeringResult", ("scores", "verdicts", "typical_norm")),
}


def _kind_of(data: dict[str, Any]) -> str | None:
    return next((k for k, (_, _, keys) in KINDS.items() if all(x in data for x in keys)), None)


def read_result(path: str | Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """The file of a saved ``kind`` result (``path`` itself, or its file in the directory
    ``path``) and its JSON object; anything else is one line naming the file."""
    name, cls, _ = KINDS[kind]
    path = Path(path)
    file = path / name if path.is_dir() else path
    if path.is_dir() and not file.exists():
        raise TlpersonaError(f"{path}: no {name} in this directory (not a saved {kind} result)")
    text = read_text(file, f"{kind} result ({name})")
    try:
        data = strict_json(text)
    except ValueError as exc:
        raise TlpersonaError(f"{file}: invalid JSON ({exc})") from None
    found = _kind_of(data) if isinstance(data, dict) else None
    if found != kind:
        what = f"a {found} result" if found else "not a tlpersona result"
        hint = f" (load it with {KINDS[found][1]}.load)" if found else ""
        raise TlpersonaError(f"{file} is {what}, not a {kind} result for {cls}.load{hint}")
    assert isinstance(data, dict)
    return file, data
