"""Which files in a store's directory are the store's: what ``--force-new`` removes
(:func:`clear_store`), whether a run may write a store into a directory
(:func:`store_dir_state`), and the temporaries a killed writer left (:func:`killed_temporaries`).

What the format owns in ``DIR`` (all that ``--force-new`` ever deletes): ``manifest.json``, the
``<position>.safetensors`` files its provenance names, ``parts/NNNNN-NNNNN.safetensors``, the
temporary files of these (``.<name>.*``), ``responses.jsonl`` and ``responses.rankR.jsonl`` when
they carry a tlpersona header, and the lock file ``tlpersona.lock``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tlpersona.cache.manifest import read_manifest
from tlpersona.cache.schema import MANIFEST, PART_FILE, PARTS, position_file
from tlpersona.data.provenance import read_header
from tlpersona.errors import TlpersonaError
from tlpersona.infra.locks import LOCK_NAME

_RESPONSES = re.compile(r"^responses(\.rank\d+)?\.jsonl$")


def is_part(name: str) -> bool:
    """A part file's name, or the temporary name it is written under (``.<name>.XXXX``)."""
    if name.startswith("."):
        name = name[1:].split(".safetensors.", 1)[0] + ".safetensors"
    return bool(PART_FILE.match(name))


def _owned(root: Path, manifest: dict[str, Any] | None) -> tuple[list[Path], list[Path]]:
    """(files the store format owns in ``root``, files it does not). Never follows links."""
    names = {MANIFEST, LOCK_NAME}
    if manifest is not None:
        prov = manifest.get("provenance")
        positions = prov.get("positions") if isinstance(prov, dict) else None
        for pos in positions if isinstance(positions, list) else []:
            if isinstance(pos, str):
                names.add(position_file(pos))
    owned: list[Path] = []
    foreign: list[Path] = []
    for p in sorted(root.iterdir()):
        own = (p.name in names or (p.name.startswith(".") and
                                   any(p.name.startswith(f".{n}.") for n in names)))
        if _RESPONSES.match(p.name) and p.is_file() and not p.is_symlink():
            own = read_header(p) is not None
        if p.name == PARTS and p.is_dir() and not p.is_symlink():
            for q in sorted(p.iterdir()):
                ok = is_part(q.name) and q.is_file() and not q.is_symlink()
                (owned if ok else foreign).append(q)
            continue
        if own and (p.is_symlink() or not p.is_file()):
            own = False
        (owned if own else foreign).append(p)
    return owned, foreign


def killed_temporaries(root: Path, manifest: dict[str, Any] | None) -> list[Path]:
    """Temporary files (``.<name>.XXXXXXXX``) of the store's own top-level files that a killed
    writer left in ``root``; only a writer holding the store's lock may remove them."""
    if not root.is_dir():
        return []
    owned, _ = _owned(root, manifest)
    return [p for p in owned if p.parent == root and p.name.startswith(".")]


def store_dir_state(root: str | Path, keep: set[Path] | None = None) -> dict[str, Any] | None:
    """The manifest of the store in ``root`` (None when there is none yet).

    Refuses a directory that holds a ``manifest.json`` of another kind, or, with no manifest,
    files that a store does not own (so a run never writes into a user's directory); ``keep``
    are files the run itself reads there (``--responses``).
    """
    root = Path(root)
    if not root.exists():
        return None
    if (root / MANIFEST).exists() or (root / MANIFEST).is_symlink():
        return read_manifest(root / MANIFEST)
    kept = {k.resolve() for k in keep or set()}
    foreign = [p for p in _owned(root, None)[1] if p.resolve() not in kept]
    if foreign:
        raise TlpersonaError(f"{root} is not empty and is not a tlpersona store "
                             f"(it holds {foreign[0].name}); use another `out`")
    return None


def clear_store(root: str | Path, keep: set[Path] | None = None) -> list[Path]:
    """Remove the files the store format owns in ``root`` for ``--force-new`` (see the module
    docstring), except ``keep``; returns them. Refuses, touching nothing, a symbolic link, a
    directory with another kind of ``manifest.json``, or one that holds any file a store does
    not own."""
    root = Path(root)
    if root.is_symlink():
        raise TlpersonaError(f"{root} is a symbolic link; `force_new` does not clear through links")
    if not root.exists():
        return []
    if not root.is_dir():
        raise TlpersonaError(f"{root} is a file, not a store directory")
    manifest = store_dir_state(root, keep)
    keep = {k.resolve() for k in keep or set()}
    owned, foreign = _owned(root, manifest)
    foreign = [p for p in foreign if p.resolve() not in keep]
    if foreign:
        raise TlpersonaError(f"{root} holds {foreign[0].relative_to(root)}, which is not the store's; "
                             "`force_new` removes nothing")
    removed = [p for p in owned if p.resolve() not in keep and p.name != LOCK_NAME]
    for p in removed:
        p.unlink()
    parts = root / PARTS
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    return removed

