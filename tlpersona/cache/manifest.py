"""The store's format: its manifest, what each position file records about itself, and the
labels that say where in a store's tensors a NaN or inf lies.

Layout of a finished store::

    DIR/manifest.json                    provenance, files with shapes and sha256
    DIR/<position>.safetensors           centroids     [persona, layer, d_model] fp32
                                         per_question  [persona, question, layer, d_model] fp16
                                                       (question-dependent positions only)
                                         valid         [persona, question] uint8 (1 = present)
    DIR/responses.jsonl                  (when response positions were extracted here)

Every file says in its own metadata what it is (:mod:`tlpersona.cache.schema`): a part file the
provenance it was made with (:mod:`tlpersona.cache.writer`); a position file its position,
layers, persona list and store, which readers and :func:`tlpersona.cache.reader.verify_store`
check against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlpersona.cache.schema import FILE_IDENTITY, FILE_IDENTITY_KEY, FILE_SHAPES, leading_shape, position_file
from tlpersona.chat.positions import canonical
from tlpersona.errors import TlpersonaError
from tlpersona.infra.paths import check_persona_names

FORMAT = "tlpersona-store/1"


#: Elements per step when scanning for NaN/inf (bounds the temporary mask to 16 MiB).
_CHUNK = 1 << 24


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


def identity_mismatch(meta: dict[str, str] | None, want: dict[str, str]) -> str | None:
    """How a position file's metadata contradicts what the manifest says it is, or None (fields
    the file lacks are not contradictions: see :func:`identity_gaps`)."""
    got = _recorded_identity(meta)
    if got is None:
        return f"has a damaged {FILE_IDENTITY_KEY!r} metadata entry"
    if got.get("position", want["position"]) != want["position"]:
        return f"holds position {got['position']}, not {want['position']} (files swapped or renamed)"
    differ = [FILE_IDENTITY[k] for k in FILE_IDENTITY if got.get(k, want[k]) != want[k]]
    return f"belongs to another store (different {', '.join(differ)})" if differ else None


def identity_gaps(meta: dict[str, str] | None) -> list[str]:
    got = _recorded_identity(meta) or {}
    return [FILE_IDENTITY[k] for k in FILE_IDENTITY if k not in got]


def read_manifest(path: Path) -> dict[str, Any]:
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

