"""Reading a finished store: :class:`Store` (opened by :func:`open_store`), :func:`read_tensor`,
and :func:`verify_store` (:func:`check_store`), which re-checks every file against the manifest.

Activations are read only when finite: each tensor read from a position file is checked once as
it is read (one vectorised pass over what was read, no second read from disk), so every analysis
and export refuses a damaged store before computing on it. A :class:`Store` stops reading once
its directory no longer holds the files it opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tlpersona.cache.manifest import (
    Labels,
    check_manifest,
    file_identity,
    identity_gaps,
    identity_mismatch,
    read_manifest,
)
from tlpersona.cache.schema import FILE_SHAPES, MANIFEST, position_file
from tlpersona.cache.vectors import PersonaVector, Reference, persona_vector
from tlpersona.chat.positions import canonical, parse_position
from tlpersona.errors import TlpersonaError

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


#: Bytes of a position file that :func:`verify_store` reads at a time.
_VERIFY_BYTES = 1 << 28


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


_Fingerprint = tuple[int, int, int, int]


def _fingerprint(path: Path) -> _Fingerprint | None:
    """Which file ``path`` is, and which version of it (None when it is gone): a file replaced
    by a rename has another inode, one rewritten in place another mtime or size."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class Store:
    """Read access to a finished store (see :func:`open_store`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.exists():
            raise TlpersonaError(f"{self.root}: not a tlpersona store (no {MANIFEST})")
        # taken before reading: a manifest replaced meanwhile reads as changed, never as this one
        self._opened = _fingerprint(path)
        self.manifest: dict[str, Any] = read_manifest(path)
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
        return identity_mismatch(meta, file_identity(self.provenance, name)) is None

    def _keys(self, name: str) -> set[str]:
        if name not in self._key_cache:
            path = self.root / position_file(name)
            if not path.exists():
                raise TlpersonaError(f"{path}: missing store file")
            self._unchanged(name)  # a new store's file is reported as that, not as a stray one
            self._files[name] = _fingerprint(path)
            with safe_open(str(path), framework="pt") as f:
                keys, meta = set(f.keys()), f.metadata()
            bad = identity_mismatch(meta, file_identity(self.provenance, name))
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
    bad = identity_mismatch(own, file_identity(st.provenance, pos))
    if bad:
        return f"{name} {bad}", []
    gaps = identity_gaps(own)
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
