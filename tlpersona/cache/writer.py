"""Writing a store: :class:`StoreWriter` creates or resumes one for a fixed provenance, and
:func:`check_parts` refuses, before any work, parts that a run could not resume.

While a run is in progress each finished group of personas is one file
``DIR/parts/<first>-<end>.safetensors``; a rerun of the same command skips those, and the last
step stacks them into the per-position files. Every file is written under a temporary name and
renamed, so a killed run never leaves a half-written file behind.

A part file records the provenance it was made with, which a resumed run must match (parts of
another run are refused, never reused). Activations are written only when finite.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tlpersona.cache.manifest import FORMAT, Labels, file_identity
from tlpersona.cache.ownership import clear_store, is_part, killed_temporaries, store_dir_state
from tlpersona.cache.schema import (
    FILE_IDENTITY_KEY,
    MANIFEST,
    PART_FILE,
    PART_KINDS,
    PART_PROVENANCE,
    PARTS,
    file_key,
    part_file,
    part_key,
    persona_key,
    position_file,
)
from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import atomic_save_tensors, atomic_write_bytes, sha256_file
from tlpersona.runtime.distributed import Ranks
from tlpersona.version import __version__


def _differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _part_problem(path: Path, made_with: str | None, provenance: dict[str, Any], vouched: bool,
                  ignore: frozenset[str] = frozenset()) -> str | None:
    """Why a part file made with ``made_with`` (its recorded provenance, JSON) may not be
    resumed by a run with ``provenance`` (fields in ``ignore`` not compared), or None. A part
    that another run made (its store's manifest removed, the directory reused with other
    settings) would have its numbers stored under this provenance. One that records nothing
    (an earlier version's) is trusted only when a manifest written before it vouches for it."""
    if made_with is None:
        return None if vouched else (f"{path} does not record the settings it was made with and "
                                     f"the store has no {MANIFEST}; use `force_new` or another `out`")
    try:
        theirs = json.loads(made_with)
    except json.JSONDecodeError:
        theirs = None
    if not isinstance(theirs, dict):
        diff = ["provenance"]
    else:
        diff = [k for k in _differing(theirs, provenance) if k not in ignore]
    if not diff:
        return None
    return (f"{path} was made by a run with a different {', '.join(diff)}; use `force_new` "
            "(it removes the store's parts) or another `out`")


def check_parts(root: str | Path, provenance: dict[str, Any],
                ignore: frozenset[str] = frozenset()) -> None:
    """Refuse, reading only headers, a directory whose ``parts/`` hold parts that a run with
    ``provenance`` could not resume (see :func:`_part_problem`): lets a command refuse before
    the work that precedes :class:`StoreWriter` (``ignore``: fields not settled yet, such as
    ``responses_hash`` before generation)."""
    root = Path(root)
    parts = root / PARTS
    if not parts.is_dir() or parts.is_symlink():
        return
    vouched = (root / MANIFEST).is_file()
    want = json.loads(json.dumps(provenance))  # as a part records it
    for path in sorted(parts.iterdir()):
        if not PART_FILE.match(path.name) or not path.is_file() or path.is_symlink():
            continue  # StoreWriter.finished names these
        try:
            with safe_open(str(path), framework="pt") as f:
                made_with = (f.metadata() or {}).get(PART_PROVENANCE)
        except Exception:  # a damaged header: StoreWriter.finished names it
            continue
        problem = _part_problem(path, made_with, want, vouched, ignore)
        if problem:
            raise TlpersonaError(problem)


class StoreWriter:
    """Creates or resumes a store for one fixed provenance.

    ``provenance`` holds everything that decides the numbers (model identity, template hash,
    layers, positions, personas, questions, prompt index, dtype, responses); a directory made with
    a different provenance is refused, naming the fields that differ.
    """

    def __init__(self, root: str | Path, provenance: dict[str, Any], info: dict[str, Any],
                 force_new: bool = False, keep: set[Path] | None = None, tidy: bool = True):
        self.root = Path(root)
        self.provenance = provenance
        manifest_path = self.root / MANIFEST
        if force_new:
            clear_store(self.root, keep)
        old = store_dir_state(self.root, keep)
        # What parts are made with (a copy: a one-pass run amends the manifest's provenance
        # before finalising) and what a part's own provenance must equal.
        self._made_with = json.dumps(provenance, sort_keys=True)
        # A part without provenance (an earlier version's) is trusted only when a manifest
        # written before it vouches for the run it belongs to.
        self._vouched = old is not None
        if old is not None:
            diff = _differing(old.get("provenance", {}), provenance)
            if diff:
                raise TlpersonaError(
                    f"{self.root} holds a store made with a different {', '.join(diff)}; "
                    "use another `out` or `force_new`"
                )
            self.manifest = old
        else:
            self.manifest = {
                "format": FORMAT,
                "code_version": __version__,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "complete": False,
                "provenance": provenance,
                **info,
            }
        if not self.complete:
            self.finished()  # parts of another run are refused before anything is written
        # ``tidy``: this process is the store's one writer (torchrun: the main rank only, as
        # other ranks open the store while the main one may be writing it)
        for stale in killed_temporaries(self.root, old) if tidy else []:
            stale.unlink()  # the store's own file, half-written by a killed run
        if old is None:
            atomic_write_bytes(manifest_path, json.dumps(self.manifest, indent=1).encode())

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def finished(self) -> dict[int, Path]:
        """Saved persona index -> the group part file that holds it."""
        out: dict[int, Path] = {}
        parts = self.root / PARTS
        if not parts.is_dir():
            return out
        n = len(self.provenance["personas"])
        for path in sorted(parts.iterdir()):
            if path.name.startswith(".") and is_part(path.name):
                continue  # a killed writer's temporary file; its group is computed again
            start, stop = ((int(x) for x in path.stem.split("-")) if PART_FILE.match(path.name)
                           else (-1, -1))
            if (not PART_FILE.match(path.name) or not path.is_file() or path.is_symlink()
                    or not 0 <= start < stop <= n or any(i in out for i in range(start, stop))):
                raise TlpersonaError(f"{path} is not a part file of this store; remove it and rerun")
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    meta = f.metadata() or {}
            except Exception as exc:  # safetensors raises its own types for a damaged header
                raise TlpersonaError(f"{path} is damaged ({type(exc).__name__}); remove it and rerun "
                                     "to compute its personas again") from None
            self._check_made_with(path, meta.get(PART_PROVENANCE))
            if not all(any(k.startswith(f"{i}/") for k in keys) for i in range(start, stop)):
                raise TlpersonaError(f"{path} lacks personas it should hold; remove it and rerun")
            out.update(dict.fromkeys(range(start, stop), path))
        return out

    def _check_made_with(self, path: Path, made_with: str | None) -> None:
        problem = _part_problem(path, made_with, json.loads(self._made_with), self._vouched)
        if problem:
            raise TlpersonaError(problem)

    def _check_finite(self, start: int, results: list[dict[str, torch.Tensor]]) -> None:
        """Refuse a group holding NaN or inf (e.g. an activation beyond float16's range, which
        the per-question rows are kept in): one line naming persona, position and layer."""
        prov = self.provenance
        for j, result in enumerate(results):
            labels = Labels([prov["personas"][start + j]], prov["questions"], prov["layers"])
            for key, t in result.items():
                pos, kind = key.rsplit("/", 1)
                where = labels.nonfinite(file_key(kind), t.unsqueeze(0))
                if where is None:
                    continue
                beyond = (" (beyond float16's range of ±65504)"
                          if t.dtype == torch.float16 and not where.startswith("NaN") else "")
                raise TlpersonaError(f"position {pos}: {where}{beyond}; nothing of "
                                     "this group of personas was stored")

    def write_group(self, start: int, results: list[dict[str, torch.Tensor]]) -> None:
        """Personas ``start … start+len(results)-1`` as one part file: a group is saved whole
        or not at all, so a resumed run never computes a saved persona again."""
        stop = start + len(results)
        self._check_finite(start, results)
        tensors = {part_key(start + j, k): v for j, r in enumerate(results) for k, v in r.items()}
        atomic_save_tensors(self.root / PARTS / part_file(start, stop), tensors,
                            {PART_PROVENANCE: self._made_with})

    def write_part(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.write_group(index, [tensors])

    def finalize(self, ranks: Ranks | None = None) -> None:
        """Stack the per-persona parts into one file per position and mark the store complete.

        Under torchrun every rank calls this once all parts are on disk: rank ``r`` of ``w``
        stacks positions ``r, r + w, …`` (the stacking scales with the study, and would otherwise
        run on rank 0 alone while the others wait), and rank 0 writes the manifest."""
        rk = ranks or Ranks()
        prov = self.provenance
        n = len(prov["personas"])
        parts = self.finished()
        missing = [i for i in range(n) if i not in parts]
        if missing:
            raise TlpersonaError(f"cannot finalise: {len(missing)} personas not extracted yet")
        positions = list(prov["positions"])
        # Two positions at a time (file reads, writes and hashing release the GIL), each part
        # read key by key: peak memory is two stacked positions.
        with ThreadPoolExecutor(max_workers=2) as pool:
            mine = dict(pool.map(lambda pos: (pos, self._stack(pos, parts, n)),
                                 positions[rk.rank::rk.world]))
        stacked = {pos: entry for part in rk.gather(mine) for pos, entry in part.items()}
        if not rk.main:
            return
        files = dict(stacked[pos] for pos in positions)
        self.manifest.update(complete=True, files=files,
                             finished=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        atomic_write_bytes(self.root / MANIFEST, json.dumps(self.manifest, indent=1).encode())
        shutil.rmtree(self.root / PARTS, ignore_errors=True)


    def _stack(self, pos: str, parts: dict[int, Path], n: int) -> tuple[str, dict[str, Any]]:
        """Write one position's file from the parts; return its manifest entry."""
        tensors: dict[str, torch.Tensor] = {}
        for i in range(n):
            with safe_open(str(parts[i]), framework="pt") as f:
                for kind in PART_KINDS:
                    name = part_key(i, persona_key(pos, kind))
                    if name not in f.keys():
                        continue
                    t = f.get_tensor(name)
                    out_key = file_key(kind)
                    if out_key not in tensors:
                        tensors[out_key] = torch.empty((n, *t.shape), dtype=t.dtype)
                    tensors[out_key][i] = t
        path = self.root / position_file(pos)
        identity = json.dumps(file_identity(self.manifest["provenance"], pos), sort_keys=True)
        atomic_save_tensors(path, tensors, {FILE_IDENTITY_KEY: identity})
        return path.name, {"sha256": sha256_file(path),
                           "shapes": {k: list(v.shape) for k, v in tensors.items()}}

