"""Activation store: a JSON manifest with provenance plus safetensors files.

Layout of a finished store::

    DIR/manifest.json                    provenance, files with shapes and sha256
    DIR/<position>.safetensors           centroids     [persona, layer, d_model] fp32
                                         per_question  [persona, question, layer, d_model] fp16
                                                       (question-dependent positions only)
                                         valid         [persona, question] uint8 (1 = present)
    DIR/responses.jsonl                  (when response positions were extracted here)

While a run is in progress each finished group of personas is one file
``DIR/parts/<first>-<end>.safetensors``; a rerun of the same command skips those, and the last
step stacks them into the per-position files. Every file is written under a temporary name and
renamed, so a killed run never leaves a half-written file behind.

Every file says in its own metadata what it is (:mod:`tlpersona.cache.schema`): a part file the
provenance it was made with, which a resumed run must match (parts of another run are refused,
never reused); a position file its position, layers, persona list and store, which readers and
:func:`verify_store` check against the manifest. Activations are written only when finite, and
read only when finite: each tensor read from a position file is checked once as it is read (one
vectorised pass over what was read, no second read from disk), so every analysis and export
refuses a damaged store before computing on it. A :class:`Store` stops reading once its
directory no longer holds the files it opened.

What the format owns in ``DIR`` (all that ``--force-new`` ever deletes): ``manifest.json``, the
``<position>.safetensors`` files its provenance names, ``parts/NNNNN-NNNNN.safetensors``, the
temporary files of these (``.<name>.*``), ``responses.jsonl`` and ``responses.rankR.jsonl`` when
they carry a tlpersona header, and the lock file ``tlpersona.lock``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
import shutil
import stat
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from tlpersona.cache.schema import (
    FILE_IDENTITY,
    FILE_IDENTITY_KEY,
    FILE_SHAPES,
    MANIFEST,
    PART_FILE,
    PART_KINDS,
    PART_PROVENANCE,
    PARTS,
    file_key,
    leading_shape,
    part_file,
    part_key,
    persona_key,
    position_file,
)
from tlpersona.cache.vectors import PersonaVector, Reference, persona_vector
from tlpersona.chat.positions import canonical, parse_position
from tlpersona.data.provenance import read_header
from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import atomic_save_tensors, atomic_write_bytes, sha256_file
from tlpersona.infra.locks import LOCK_NAME
from tlpersona.infra.safety import check_persona_names
from tlpersona.runtime.distributed import Ranks
from tlpersona.version import __version__

FORMAT = "tlpersona-store/1"


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


def read_tensor(path: Path, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor of a safetensors file (or rows ``[start, stop)`` of its first dimension) by
    plain reads into its own buffer.

    Unlike a memory map, reading a multi-GB tensor this way does not also count the mapped file
    pages against the process's memory.
    """
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        if key not in header:
            raise TlpersonaError(f"{path}: no tensor {key!r}")
        info = header[key]
        start, stop = info["data_offsets"]
        shape = list(info["shape"])
        if rows is not None:
            row_bytes = (stop - start) // max(shape[0], 1)
            lo, hi = max(0, rows[0]), min(shape[0], rows[1])
            start, stop = start + lo * row_bytes, start + hi * row_bytes
            shape[0] = hi - lo
        if info["dtype"] not in _DTYPES:
            raise TlpersonaError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which a store "
                                 "does not use")
        out = torch.empty(shape, dtype=_DTYPES[info["dtype"]])
        buf: Any = out.view(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
        if stop - start != len(buf):
            raise TlpersonaError(f"{path}: tensor {key!r} has a corrupt header")
        f.seek(8 + header_len + start)
        if f.readinto(buf) != len(buf):
            raise TlpersonaError(f"{path}: truncated tensor {key!r}")
    return out


#: Elements per step when scanning for NaN/inf (bounds the temporary mask to 16 MiB).
_CHUNK = 1 << 24
#: Bytes of a position file that :func:`verify_store` reads at a time.
_VERIFY_BYTES = 1 << 28


def _all_finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    if t.dtype == torch.float16:
        # A sum is finite exactly when every term is, and float16 terms cannot overflow a
        # float32 sum; chunked, so the float32 copy the sum makes stays small.
        return all(bool(torch.isfinite(c.sum(dtype=torch.float32))) for c in flat.split(_CHUNK))
    return all(bool(torch.isfinite(c).all()) for c in flat.split(_CHUNK))


def _first_nonfinite(t: torch.Tensor) -> tuple[tuple[int, ...], float] | None:
    """Index and value of the first NaN or infinity in ``t`` (None when all are finite)."""
    if _all_finite(t):
        return None
    flat = t.reshape(-1)
    k = next(s + int(bad[0]) for s in range(0, flat.numel(), _CHUNK)
             if len(bad := (~torch.isfinite(flat[s:s + _CHUNK])).nonzero()))
    return tuple(int(i) for i in np.unravel_index(k, tuple(t.shape))), float(flat[k])


@dataclass(frozen=True)
class Labels:
    """What the personas, questions and layers of a store's tensors are called."""

    personas: Sequence[str]
    questions: Sequence[str]
    layers: Sequence[int]

    def nonfinite(self, key: str, t: torch.Tensor, start: int = 0,
                  layer: int | None = None) -> str | None:
        """Where a position file's tensor ``key`` (or personas from ``start`` of it, or one
        ``layer`` of it) holds NaN or inf, e.g. "NaN in per_question at persona 'pirate', question
        'q1', layer 15"; None when it holds none."""
        hit = _first_nonfinite(t)
        if hit is None:
            return None
        index, value = list(hit[0]), hit[1]
        dims = FILE_SHAPES[key]
        index[0] += start
        if layer is not None:
            index.insert(dims.index("l"), self.layers.index(layer))
        axes = {"p": ("persona", self.personas), "q": ("question", self.questions),
                "l": ("layer", self.layers)}
        where = ", ".join(f"{axes[d][0]} {axes[d][1][i]!r}"
                          for d, i in zip(dims, index[:len(dims)], strict=True))
        return f"{'NaN' if math.isnan(value) else value} in {key} at {where}"


@dataclass(frozen=True)
class _Stored:
    """Where one tensor of a safetensors file lies (offsets into the data section)."""

    key: str
    start: int
    stop: int
    dtype: torch.dtype | None  # None: a dtype a store does not use
    shape: list[int]


def _layout(raw: bytes, data_bytes: int) -> list[_Stored]:
    """A safetensors header's tensors in file order; [] when the header is malformed or its
    tensors do not tile the data section (the file is then only hashed)."""
    try:
        header = json.loads(raw)
        out = sorted((_Stored(k, int(v["data_offsets"][0]), int(v["data_offsets"][1]),
                              _DTYPES.get(v["dtype"]), [int(x) for x in v["shape"]])
                      for k, v in header.items() if k != "__metadata__"), key=lambda t: t.start)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return []
    ends = [0] + [t.stop for t in out]
    tiled = all(t.start == end and min(t.shape, default=1) >= 0 and t.stop - t.start ==
                math.prod(t.shape) * (t.dtype.itemsize if t.dtype else 1)
                for t, end in zip(out, ends, strict=False))
    return out if tiled and ends[-1] <= data_bytes else []


def _scan_file(path: Path, labels: Labels) -> tuple[str, str | None]:
    """A position file's sha256 and where its tensors first hold NaN or inf (None: nowhere),
    from one sequential read, so that verifying a multi-GB store reads it once."""
    h = hashlib.sha256()
    found = None
    with path.open("rb") as f:
        head = f.read(8)
        raw = f.read(struct.unpack("<Q", head)[0]) if len(head) == 8 else b""
        h.update(head + raw)
        for t in _layout(raw, path.stat().st_size - 8 - len(raw)):
            rows = t.shape[0] if t.shape else 1
            row_bytes = (t.stop - t.start) // max(rows, 1)
            step = max(1, _VERIFY_BYTES // max(1, row_bytes))
            for lo in range(0, rows, step):
                n = min(step, rows - lo)
                buf = torch.empty(n * row_bytes, dtype=torch.uint8)
                view: Any = buf.numpy()
                got = f.readinto(view)
                h.update(view[:got])
                if t.key in FILE_SHAPES and t.dtype is not None and t.shape and got == len(buf):
                    rows_read = buf.view(t.dtype).view(n, *t.shape[1:])
                    found = found or labels.nonfinite(t.key, rows_read, lo)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest(), found


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_identity(provenance: dict[str, Any], position: str) -> dict[str, str]:
    """What a position file of a store with this provenance records about itself. The store's
    hash leaves out ``responses_hash``: a one-pass run settles it on rank 0 only, after every
    part is written, while all ranks write position files."""
    return {"position": position, "layers": json.dumps(provenance["layers"]),
            "personas_sha256": _digest(provenance["personas"]),
            "store_sha256": _digest({k: v for k, v in provenance.items() if k != "responses_hash"})}


def _recorded_identity(meta: dict[str, str] | None) -> dict[str, str] | None:
    """What a position file's metadata says it is (of an earlier version's file: its position
    alone, or nothing); None when the record is damaged."""
    meta = meta or {}
    if FILE_IDENTITY_KEY not in meta:
        return {k: meta[k] for k in ("position",) if k in meta}
    try:
        recorded = json.loads(meta[FILE_IDENTITY_KEY])
    except json.JSONDecodeError:
        return None
    ok = isinstance(recorded, dict) and all(isinstance(v, str) for v in recorded.values())
    return recorded if ok else None


def _identity_mismatch(meta: dict[str, str] | None, want: dict[str, str]) -> str | None:
    """How a position file's metadata contradicts what the manifest says it is, or None (fields
    the file lacks are not contradictions: see :func:`_identity_gaps`)."""
    got = _recorded_identity(meta)
    if got is None:
        return f"has a damaged {FILE_IDENTITY_KEY!r} metadata entry"
    if got.get("position", want["position"]) != want["position"]:
        return f"holds position {got['position']}, not {want['position']} (files swapped or renamed)"
    differ = [FILE_IDENTITY[k] for k in FILE_IDENTITY if got.get(k, want[k]) != want[k]]
    return f"belongs to another store (different {', '.join(differ)})" if differ else None


def _identity_gaps(meta: dict[str, str] | None) -> list[str]:
    got = _recorded_identity(meta) or {}
    return [FILE_IDENTITY[k] for k in FILE_IDENTITY if k not in got]


_Fingerprint = tuple[int, int, int, int]


def _fingerprint(path: Path) -> _Fingerprint | None:
    """Which file ``path`` is, and which version of it (None when it is gone): a file replaced
    by a rename has another inode, one rewritten in place another mtime or size."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


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


_RESPONSES = re.compile(r"^responses(\.rank\d+)?\.jsonl$")


def _is_part(name: str) -> bool:
    """A part file's name, or the temporary name it is written under (``.<name>.XXXX``)."""
    if name.startswith("."):
        name = name[1:].split(".safetensors.", 1)[0] + ".safetensors"
    return bool(PART_FILE.match(name))


def _read_manifest(path: Path) -> dict[str, Any]:
    """A manifest's JSON object; anything else (unreadable, not JSON, another format) is one line."""
    if not path.is_file():
        raise TlpersonaError(f"{path}: not a regular file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TlpersonaError(f"{path}: invalid JSON ({exc})") from None
    except OSError as exc:
        raise TlpersonaError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise TlpersonaError(f"{path}: not a tlpersona store manifest (format {got!r})")
    return data


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
                ok = _is_part(q.name) and q.is_file() and not q.is_symlink()
                (owned if ok else foreign).append(q)
            continue
        if own and (p.is_symlink() or not p.is_file()):
            own = False
        (owned if own else foreign).append(p)
    return owned, foreign


def _killed_temporaries(root: Path, manifest: dict[str, Any] | None) -> list[Path]:
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
        return _read_manifest(root / MANIFEST)
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
        for stale in _killed_temporaries(self.root, old) if tidy else []:
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
            if path.name.startswith(".") and _is_part(path.name):
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


class Store:
    """Read access to a finished store (see :func:`open_store`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.exists():
            raise TlpersonaError(f"{self.root}: not a tlpersona store (no {MANIFEST})")
        # taken before reading: a manifest replaced meanwhile reads as changed, never as this one
        self._opened = _fingerprint(path)
        self.manifest: dict[str, Any] = _read_manifest(path)
        if self.manifest.get("complete") is not True:
            raise TlpersonaError(f"{self.root}: the store is incomplete; rerun extract to resume it")
        check_manifest(self.manifest, path)
        prov = self.manifest["provenance"]
        self.personas: list[str] = list(prov["personas"])
        self.questions: list[str] = list(prov["questions"])
        self.layers: list[int] = list(prov["layers"])
        self.positions: list[str] = list(prov["positions"])
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._key_cache: dict[str, set[str]] = {}
        self._files: dict[str, _Fingerprint | None] = {}  # position -> its file when first read
        self.labels = Labels(self.personas, self.questions, self.layers)

    @property
    def provenance(self) -> dict[str, Any]:
        return self.manifest["provenance"]

    @property
    def manifest_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.provenance, sort_keys=True).encode()).hexdigest()

    def _name(self, position: str) -> str:
        name = canonical(position)
        if name not in self.positions:
            raise TlpersonaError(
                f"position {name} is not in this store (it has {', '.join(self.positions)})"
            )
        return name

    def _unchanged(self, name: str) -> None:
        """Refuse to go on once the directory no longer holds the files this object opened (a
        new store written into it): their numbers would be labelled with this manifest."""
        files = [(MANIFEST, self._opened)]
        if name in self._files:
            files.append((position_file(name), self._files[name]))
        for file, was in files:
            now = _fingerprint(self.root / file)
            if now != was and not self._renumbered(file, was, now):
                raise TlpersonaError(f"{self.root} changed after it was opened ({file} was "
                                     "replaced or modified); open the store again")

    def _renumbered(self, file: str, was: _Fingerprint | None, now: _Fingerprint | None) -> bool:
        """Whether only the inode number moved (FUSE mounts such as Drive or gcsfuse renumber
        files when their cache drops them): same mtime and size, and the manifest's content
        unchanged (for the manifest) or the file's identity unchanged (for a position file)."""
        if was is None or now is None or was[2:] != now[2:]:
            return False
        path = self.root / file
        if file == MANIFEST:
            try:
                return json.loads(path.read_bytes()).get("provenance") == self.provenance
            except (OSError, ValueError):
                return False
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        name = file.removesuffix(".safetensors")
        return _identity_mismatch(meta, file_identity(self.provenance, name)) is None

    def _keys(self, name: str) -> set[str]:
        if name not in self._key_cache:
            path = self.root / position_file(name)
            if not path.exists():
                raise TlpersonaError(f"{path}: missing store file")
            self._unchanged(name)  # a new store's file is reported as that, not as a stray one
            self._files[name] = _fingerprint(path)
            with safe_open(str(path), framework="pt") as f:
                keys, meta = set(f.keys()), f.metadata()
            bad = _identity_mismatch(meta, file_identity(self.provenance, name))
            if bad:
                raise TlpersonaError(f"{path} {bad}; the store is damaged")
            self._key_cache[name] = keys
        self._unchanged(name)
        return self._key_cache[name]

    def _checked(self, name: str, key: str, t: torch.Tensor, start: int = 0,
                 layer: int | None = None) -> torch.Tensor:
        """``t`` as read from ``name``'s file, once that file is known to be unchanged and ``t``
        to hold no NaN or inf."""
        self._unchanged(name)
        where = self.labels.nonfinite(key, t, start, layer)
        if where:
            raise TlpersonaError(f"{self.root / position_file(name)} (position {name}): "
                                 f"{where}; the store is damaged, extract it again")
        return t

    def _tensor(self, position: str, key: str) -> torch.Tensor | None:
        """One small tensor of a position file (centroids, valid, n_tokens), read once on demand;
        per-question tensors (GBs) go through :func:`read_tensor` uncached."""
        name = self._name(position)
        if key not in self._keys(name):
            return None
        if (name, key) not in self._cache:
            with safe_open(str(self.root / position_file(name)), framework="pt") as f:
                t = f.get_tensor(key)
            self._cache[(name, key)] = self._checked(name, key, t)
        return self._cache[(name, key)]

    def question_invariant(self, position: str) -> bool:
        return parse_position(self._name(position)).question_invariant

    def centroids(self, position: str) -> torch.Tensor:
        """``[persona, layer, d_model]`` fp32 mean over (valid) questions."""
        t = self._tensor(position, "centroids")
        assert t is not None
        return t

    def _per_question_name(self, position: str) -> str:
        name = self._name(position)
        if "per_question" not in self._keys(name):
            raise TlpersonaError(f"{name} does not depend on the question: only centroids are stored")
        return name

    def has_per_question(self, position: str) -> bool:
        return "per_question" in self._keys(self._name(position))

    def per_question(self, position: str, layer: int | None = None) -> torch.Tensor:
        """``[persona, question, layer, d_model]`` fp16; rows with ``valid == 0`` are zeros.

        With ``layer`` (a layer number, not an index), only that layer is read from disk:
        ``[persona, question, d_model]``.
        """
        name = self._per_question_name(position)
        path = self.root / position_file(name)
        if layer is None:
            return self._checked(name, "per_question", read_tensor(path, "per_question"))
        li = self.layer_index(layer)
        with safe_open(str(path), framework="pt") as f:
            t = f.get_slice("per_question")[:, :, li, :]
        return self._checked(name, "per_question", t, layer=layer)

    def per_question_rows(self, position: str, start: int, stop: int) -> torch.Tensor:
        """Personas ``[start, stop)`` of :meth:`per_question`: ``[stop-start, question, layer, d]``."""
        name = self._per_question_name(position)
        t = read_tensor(self.root / position_file(name), "per_question", (start, stop))
        return self._checked(name, "per_question", t, max(0, start))

    def n_tokens(self, position: str) -> torch.Tensor | None:
        """``[persona, question]`` tokens averaged by a pooled position (None for single tokens)."""
        return self._tensor(position, "n_tokens")

    def valid(self, position: str) -> torch.Tensor:
        """``[persona, question]`` bool: which per-question rows exist."""
        t = self._tensor(position, "valid")
        if t is None:
            return torch.ones(len(self.personas), len(self.questions), dtype=torch.bool)
        return t.bool()

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise TlpersonaError(f"layer {layer} is not in this store (it has {self.layers})")
        return self.layers.index(layer)

    def persona_vector(self, persona: str, position: str, layer: int,
                       relative_to: Reference = "all") -> PersonaVector:
        """``persona``'s vector for one recipe and layer with its provenance (see
        :mod:`tlpersona.cache.vectors`): centroid minus the mean of all personas (``"all"``)
        or of the other personas (``"others"``, the persona's axis)."""
        return persona_vector(self, persona, position, layer, relative_to)


def _problem(manifest: dict[str, Any]) -> str | None:
    """The first way a complete store's manifest breaks the format's schema, or None."""
    prov = manifest.get("provenance")
    if not isinstance(prov, dict):
        return "provenance is not an object"
    for key in ("personas", "questions", "positions", "layers"):
        value = prov.get(key)
        if not isinstance(value, list) or not value:
            return f"provenance.{key} is not a non-empty list"
        if len(set(map(str, value))) != len(value):
            return f"provenance.{key} has duplicates"
    if not all(isinstance(q, str) for q in prov["questions"]):
        return "provenance.questions holds a non-string id"
    if not all(type(x) is int and x >= 0 for x in prov["layers"]):
        return "provenance.layers holds something other than block indices"
    for pos in prov["positions"]:
        try:
            ok = isinstance(pos, str) and canonical(pos) == pos
        except TlpersonaError:
            ok = False
        if not ok:
            return f"provenance.positions holds {pos!r}, not a position name"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "files is not an object"
    allowed = {position_file(p) for p in prov["positions"]}
    n_p, n_q, n_l = len(prov["personas"]), len(prov["questions"]), len(prov["layers"])
    for name, meta in files.items():
        if name not in allowed:
            return f"files lists {name!r}, which is not a file of its positions"
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) \
                or not isinstance(meta.get("shapes"), dict):
            return f"files.{name} lacks sha256 or shapes"
        shapes = meta["shapes"]
        want = {k: leading_shape(k, n_p, n_q, n_l) for k in FILE_SHAPES}
        if "centroids" not in shapes:
            return f"files.{name} has no centroids"
        for key, shape in shapes.items():
            if key not in want or not isinstance(shape, list) \
                    or shape[:len(want[key])] != want[key]:
                return (f"files.{name}: {key} shape {shape} does not fit {n_p} personas, "
                        f"{n_q} questions and {n_l} layers")
    return None


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a complete store's manifest that breaks the schema (one line naming the field);
    persona names must be safe file names, since export writes them as such."""
    problem = _problem(manifest)
    if problem:
        raise TlpersonaError(f"{path}: {problem}")
    check_persona_names(manifest["provenance"]["personas"], str(path))


@dataclass(frozen=True)
class StoreCheck:
    """What :func:`check_store` found: ``problems`` (the store is damaged or mislabelled; empty
    when intact) and ``notes`` (checks a file written by an earlier version cannot support)."""

    problems: list[str]
    notes: list[str]


def _check_file(st: Store, name: str, meta: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(the first problem of one listed file or None, its notes)."""
    f = st.root / name
    if not f.exists() and not f.is_symlink():
        return f"{name}: missing", []
    # only plain files inside the store are read (a link could point at /dev/zero)
    if f.is_symlink() or not stat.S_ISREG(f.lstat().st_mode):
        return f"{name}: not a regular file", []
    digest, where = _scan_file(f, st.labels)
    if digest != meta["sha256"]:
        return f"{name}: checksum mismatch (corrupted or modified)", []
    try:
        with safe_open(str(f), framework="pt") as sf:
            shapes = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
            own = sf.metadata()
    except Exception as exc:  # safetensors raises its own types for a damaged file
        return f"{name}: unreadable safetensors file ({type(exc).__name__})", []
    if shapes != meta["shapes"]:
        return f"{name}: tensor shapes {shapes} differ from the manifest's", []
    pos = name.removesuffix(".safetensors")
    bad = _identity_mismatch(own, file_identity(st.provenance, pos))
    if bad:
        return f"{name} {bad}", []
    gaps = _identity_gaps(own)
    notes = [f"{name}: written by an earlier version that did not record its {', '.join(gaps)}, "
             "which are not checked"] if gaps else []
    return (f"{name} (position {pos}): {where}" if where else None), notes


def check_store(path: str | Path) -> StoreCheck:
    """Re-check every file the manifest lists: presence, sha256, tensor shapes, that each file
    is the position of this store it is listed as, and that it holds no NaN or inf."""
    st = Store(path)
    problems, notes = [], []
    for name, meta in st.manifest["files"].items():
        problem, more = _check_file(st, name, meta)
        problems += [problem] if problem else []
        notes += more
    listed = set(st.manifest.get("files", {}))
    for pos in st.positions:
        if position_file(pos) not in listed:
            problems.append(f"{position_file(pos)}: not listed in the manifest")
    return StoreCheck(problems, notes)


def verify_store(path: str | Path) -> list[str]:
    """:func:`check_store`'s problems: one line each; an empty list means the store is intact."""
    return check_store(path).problems


def open_store(path: str | Path, verify: bool = False) -> Store:
    """Open a finished activation store for reading; ``verify`` re-checks every file first."""
    if verify:
        problems = verify_store(path)
        if problems:
            raise TlpersonaError(f"{path} fails verification: {'; '.join(problems)}")
    return Store(path)
