"""Activation store: a JSON manifest with provenance plus safetensors files.

Layout of a finished store::

    DIR/manifest.json                    provenance, files with shapes and sha256
    DIR/<position>.safetensors           centroids     [persona, layer, d_model] fp32
                                         per_question  [persona, question, layer, d_model] fp16
                                                       (question-dependent positions only)
                                         valid         [persona, question] uint8 (1 = present)
    DIR/responses.jsonl                  (when response positions were extracted here)

While a run is in progress each finished persona is one file ``DIR/parts/<index>.safetensors``;
a rerun of the same command skips those, and the last step stacks them into the per-position
files. Every file is written under a temporary name and renamed, so a killed run never leaves a
half-written file behind.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tlpersona import __version__
from tlpersona.errors import TlpersonaError
from tlpersona.positions import canonical, parse_position

FORMAT = "tlpersona-store/1"
MANIFEST = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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

    def part_path(self, index: int) -> Path:
        return self.root / "parts" / f"{index:05d}.safetensors"

    def done(self, index: int) -> bool:
        return self.part_path(index).exists()

    def write_part(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_tensors(self.part_path(index), tensors)

    def finalize(self) -> None:
        """Stack the per-persona parts into one file per position and mark the store complete."""
        prov = self.provenance
        n = len(prov["personas"])
        missing = [i for i in range(n) if not self.done(i)]
        if missing:
            raise TlpersonaError(f"cannot finalise: {len(missing)} personas not extracted yet")
        parts = [load_file(self.part_path(i)) for i in range(n)]
        files = {}
        for pos in prov["positions"]:
            tensors = {"centroids": torch.stack([p[f"{pos}/centroid"] for p in parts])}
            if f"{pos}/per_question" in parts[0]:
                tensors["per_question"] = torch.stack([p[f"{pos}/per_question"] for p in parts])
                tensors["valid"] = torch.stack([p[f"{pos}/valid"] for p in parts])
            path = self.root / position_file(pos)
            atomic_save_tensors(path, tensors, {"position": pos})
            files[path.name] = {
                "sha256": sha256_file(path),
                "shapes": {k: list(v.shape) for k, v in tensors.items()},
            }
        self.manifest.update(complete=True, files=files,
                             finished=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        atomic_write_bytes(self.root / MANIFEST, json.dumps(self.manifest, indent=1).encode())
        shutil.rmtree(self.root / "parts", ignore_errors=True)


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
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

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

    def _load(self, position: str) -> dict[str, torch.Tensor]:
        name = self._name(position)
        if name not in self._cache:
            path = self.root / position_file(name)
            if not path.exists():
                raise TlpersonaError(f"{path}: missing store file")
            self._cache[name] = load_file(path)
        return self._cache[name]

    def question_invariant(self, position: str) -> bool:
        return parse_position(self._name(position)).question_invariant

    def centroids(self, position: str) -> torch.Tensor:
        """``[persona, layer, d_model]`` fp32 mean over (valid) questions."""
        return self._load(position)["centroids"]

    def per_question(self, position: str) -> torch.Tensor:
        """``[persona, question, layer, d_model]`` fp16; rows with ``valid == 0`` are zeros."""
        data = self._load(position)
        if "per_question" not in data:
            raise TlpersonaError(
                f"{self._name(position)} does not depend on the question: only centroids are stored"
            )
        return data["per_question"]

    def valid(self, position: str) -> torch.Tensor:
        """``[persona, question]`` bool: which per-question rows exist."""
        data = self._load(position)
        if "valid" not in data:
            return torch.ones(len(self.personas), len(self.questions), dtype=torch.bool)
        return data["valid"].bool()

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise TlpersonaError(f"layer {layer} is not in this store (it has {self.layers})")
        return self.layers.index(layer)


def open_store(path: str | Path) -> Store:
    """Open a finished activation store for reading."""
    return Store(path)
