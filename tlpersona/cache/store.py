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
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tlpersona import __version__
from tlpersona.errors import TlpersonaError
from tlpersona.files import atomic_save_tensors, atomic_write_bytes, sha256_file
from tlpersona.positions import canonical, parse_position

FORMAT = "tlpersona-store/1"
MANIFEST = "manifest.json"


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
        out = torch.empty(shape, dtype=_DTYPES[info["dtype"]])
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
        if stop - start != len(buf):
            raise TlpersonaError(f"{path}: tensor {key!r} has a corrupt header")
        f.seek(8 + header_len + start)
        if f.readinto(buf) != len(buf):
            raise TlpersonaError(f"{path}: truncated tensor {key!r}")
    return out


def position_file(position: str) -> str:
    return f"{position}.safetensors"


def clear_store(root: str | Path) -> None:
    """Remove a store directory for ``--force-new``; refuses a directory that is not a store."""
    root = Path(root)
    if not root.exists():
        return
    if not (root / MANIFEST).exists() and any(p.name != "responses.jsonl" for p in root.iterdir()):
        raise TlpersonaError(f"{root} is not a tlpersona store; not removing it")
    shutil.rmtree(root)


class StoreWriter:
    """Creates or resumes a store for one fixed provenance.

    ``provenance`` holds everything that decides the numbers (model identity, template hash,
    layers, positions, personas, questions, prompt index, dtype, responses); a directory made with
    a different provenance is refused, naming the fields that differ.
    """

    def __init__(self, root: str | Path, provenance: dict[str, Any], info: dict[str, Any],
                 force_new: bool = False):
        self.root = Path(root)
        self.provenance = provenance
        manifest_path = self.root / MANIFEST
        if force_new:
            clear_store(self.root)
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            diff = [k for k in sorted(set(old.get("provenance", {})) | set(provenance))
                    if old.get("provenance", {}).get(k) != provenance.get(k)]
            if diff:
                raise TlpersonaError(
                    f"{self.root} holds a store made with a different {', '.join(diff)}; "
                    "use another --out or --force-new"
                )
            self.manifest = old
        else:
            if self.root.exists() and any(self.root.iterdir()):
                stray = [p.name for p in self.root.iterdir() if p.name != "responses.jsonl"]
                if stray:
                    raise TlpersonaError(f"{self.root} is not empty and is not a tlpersona store")
            self.manifest = {
                "format": FORMAT,
                "code_version": __version__,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "complete": False,
                "provenance": provenance,
                **info,
            }
            atomic_write_bytes(manifest_path, json.dumps(self.manifest, indent=1).encode())

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def finished(self) -> dict[int, Path]:
        """Saved persona index -> the group part file that holds it."""
        out = {}
        for path in sorted((self.root / "parts").glob("*-*.safetensors")):
            start, stop = (int(x) for x in path.stem.split("-"))
            out.update(dict.fromkeys(range(start, stop), path))
        return out

    def write_group(self, start: int, results: list[dict[str, torch.Tensor]]) -> None:
        """Personas ``start … start+len(results)-1`` as one part file: a group is saved whole
        or not at all, so a resumed run never computes a saved persona again."""
        stop = start + len(results)
        tensors = {f"{start + j}/{k}": v for j, r in enumerate(results) for k, v in r.items()}
        atomic_save_tensors(self.root / "parts" / f"{start:05d}-{stop:05d}.safetensors", tensors)

    def write_part(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.write_group(index, [tensors])

    def finalize(self) -> None:
        """Stack the per-persona parts into one file per position and mark the store complete."""
        prov = self.provenance
        n = len(prov["personas"])
        parts = self.finished()
        missing = [i for i in range(n) if i not in parts]
        if missing:
            raise TlpersonaError(f"cannot finalise: {len(missing)} personas not extracted yet")
        # Two positions at a time (file reads, writes and hashing release the GIL), each part
        # read key by key: peak memory is two stacked positions.
        with ThreadPoolExecutor(max_workers=2) as pool:
            files = dict(pool.map(lambda pos: self._stack(pos, parts, n), prov["positions"]))
        self.manifest.update(complete=True, files=files,
                             finished=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        atomic_write_bytes(self.root / MANIFEST, json.dumps(self.manifest, indent=1).encode())
        shutil.rmtree(self.root / "parts", ignore_errors=True)


    def _stack(self, pos: str, parts: dict[int, Path], n: int) -> tuple[str, dict[str, Any]]:
        """Write one position's file from the parts; return its manifest entry."""
        tensors: dict[str, torch.Tensor] = {}
        for i in range(n):
            with safe_open(str(parts[i]), framework="pt") as f:
                for key in ("centroid", "per_question", "valid", "n_tokens"):
                    name = f"{i}/{pos}/{key}"
                    if name not in f.keys():
                        continue
                    t = f.get_tensor(name)
                    out_key = "centroids" if key == "centroid" else key
                    if out_key not in tensors:
                        tensors[out_key] = torch.empty((n, *t.shape), dtype=t.dtype)
                    tensors[out_key][i] = t
        path = self.root / position_file(pos)
        atomic_save_tensors(path, tensors, {"position": pos})
        return path.name, {"sha256": sha256_file(path),
                           "shapes": {k: list(v.shape) for k, v in tensors.items()}}


class Store:
    """Read access to a finished store (see :func:`open_store`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.exists():
            raise TlpersonaError(f"{self.root}: not a tlpersona store (no {MANIFEST})")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TlpersonaError(f"{path}: invalid JSON ({exc})") from None
        if self.manifest.get("format") != FORMAT:
            raise TlpersonaError(f"{path}: unknown store format {self.manifest.get('format')!r}")
        if not self.manifest.get("complete"):
            raise TlpersonaError(f"{self.root}: the store is incomplete; rerun extract to resume it")
        prov = self.manifest["provenance"]
        self.personas: list[str] = list(prov["personas"])
        self.questions: list[str] = list(prov["questions"])
        self.layers: list[int] = list(prov["layers"])
        self.positions: list[str] = list(prov["positions"])
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._key_cache: dict[str, set[str]] = {}

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

    def _keys(self, name: str) -> set[str]:
        if name not in self._key_cache:
            path = self.root / position_file(name)
            if not path.exists():
                raise TlpersonaError(f"{path}: missing store file")
            with safe_open(str(path), framework="pt") as f:
                self._key_cache[name] = set(f.keys())
        return self._key_cache[name]

    def _tensor(self, position: str, key: str) -> torch.Tensor | None:
        """One small tensor of a position file (centroids, valid, n_tokens), read once on demand;
        per-question tensors (GBs) go through :func:`read_tensor` uncached."""
        name = self._name(position)
        if key not in self._keys(name):
            return None
        if (name, key) in self._cache:
            return self._cache[(name, key)]
        with safe_open(str(self.root / position_file(name)), framework="pt") as f:
            self._cache[(name, key)] = f.get_tensor(key)
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
        if layer is None:
            return read_tensor(self.root / position_file(name), "per_question")
        li = self.layer_index(layer)
        with safe_open(str(self.root / position_file(name)), framework="pt") as f:
            return f.get_slice("per_question")[:, :, li, :]

    def per_question_rows(self, position: str, start: int, stop: int) -> torch.Tensor:
        """Personas ``[start, stop)`` of :meth:`per_question`: ``[stop-start, question, layer, d]``."""
        name = self._per_question_name(position)
        return read_tensor(self.root / position_file(name), "per_question", (start, stop))

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


def verify_store(path: str | Path) -> list[str]:
    """Re-check every file the manifest lists (presence, sha256, tensor shapes).

    Returns one line per problem; an empty list means the store is intact.
    """
    st = Store(path)
    problems = []
    for name, meta in st.manifest.get("files", {}).items():
        f = st.root / name
        if not f.exists():
            problems.append(f"{name}: missing")
            continue
        if sha256_file(f) != meta["sha256"]:
            problems.append(f"{name}: checksum mismatch (corrupted or modified)")
            continue
        with safe_open(str(f), framework="pt") as sf:
            shapes = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
        if shapes != meta["shapes"]:
            problems.append(f"{name}: tensor shapes {shapes} differ from the manifest's")
    listed = set(st.manifest.get("files", {}))
    for pos in st.positions:
        if position_file(pos) not in listed:
            problems.append(f"{position_file(pos)}: not listed in the manifest")
    return problems


def open_store(path: str | Path, verify: bool = False) -> Store:
    """Open a finished activation store for reading; ``verify`` re-checks every file first."""
    if verify:
        problems = verify_store(path)
        if problems:
            raise TlpersonaError(f"{path} fails verification: {'; '.join(problems)}")
    return Store(path)
