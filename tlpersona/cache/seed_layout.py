"""The seed experiment's on-disk layout, for users with older code and results.

::

    DIR/method_<a|b|bstar|bstar_no_last|c1|c2|c3>/all_centroids.pt   {role: [n_layers, d]}
    DIR/method_<x>/<role>__per_q.pt                                  [n_questions, n_layers, d]
    DIR/method_<x>/metadata.json                                     {"layers": [...], ...}

``.pt`` files are read with ``torch.load(weights_only=True)`` (no pickled code runs), and every
value is checked (tensors of consistent shapes, finite, the layer count of ``metadata.json``).

An export writes ``"tlpersona_seed_layout": 1``, the position and its store's manifest hash
(``source``) into each ``metadata.json``; the reader refuses method folders from different
sources, and an export replaces only folders that an export wrote (never a layout made by other
code). An export writes a folder's ``metadata.json`` first, marked ``"complete": false``, and
marks it complete after the folder's last file: the reader refuses a folder whose export was
killed, and the next export replaces it. Nothing is written into a store's directory.

Every file is checked to be a regular file before it is opened (a FIFO would block forever).

``method_b`` in a layout other code wrote holds the seed's response mean, which averages the
template's closing tokens after the response too: it is read as ``response_mean_seed``, not as
``response_mean`` (which leaves them out). An export writes ``response_mean_seed`` to
``method_b`` when the store has it, else ``response_mean`` (labelled so in its metadata).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from tlpersona.cache.reader import Store
from tlpersona.chat.positions import RECIPES, canonical, parse_position
from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import atomic_save_pt, atomic_write_bytes
from tlpersona.infra.paths import check_persona_names, in_store, inside
from tlpersona.infra.reading import check_regular_file, read_text, strict_json

_BY_POSITION = {v: k for k, v in RECIPES.items()}
MARK = "tlpersona_seed_layout"
#: What the seed's method B averaged: response and closing tokens.
SEED_B = "response_mean_seed"


def _position(alias: str, meta: dict) -> str:
    """The position a method folder holds: what an export recorded, else the seed's meaning."""
    recorded = meta.get("position")
    if meta.get(MARK) and recorded in (*RECIPES.values(), SEED_B):
        return recorded
    return SEED_B if alias == "b" else RECIPES[alias]


def _metadata(mdir: Path) -> dict:
    """A method folder's ``metadata.json`` ({} when there is none)."""
    path = mdir / "metadata.json"
    if not path.exists():
        return {}
    try:
        meta = strict_json(read_text(path, "JSON file"))
    except ValueError as exc:
        raise TlpersonaError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TlpersonaError(f"{path}: expected a JSON object")
    return meta


def _layers(meta: dict, path: Path) -> list[int] | None:
    layers = meta.get("layers")
    if layers is None:
        return None
    if not isinstance(layers, list) or not layers or not all(type(x) is int and x >= 0 for x in layers):
        raise TlpersonaError(f"{path}: 'layers' must be a list of block indices, not {layers!r}")
    if len(set(layers)) != len(layers):
        raise TlpersonaError(f"{path}: 'layers' has duplicates")
    return layers


def _tensor(value: object, where: str, shape: tuple[int, ...] | None, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TlpersonaError(f"{where}: expected a tensor, found {type(value).__name__}")
    if value.dim() != ndim or (shape is not None and tuple(value.shape) != shape):
        raise TlpersonaError(f"{where}: tensor of shape {list(value.shape)}, expected "
                             + (f"{list(shape)}" if shape is not None else f"{ndim} dimensions"))
    if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
        raise TlpersonaError(f"{where}: not a finite floating-point tensor")
    return value.float()


def _load_pt(path: Path) -> object:
    check_regular_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unsafe or corrupt files
        raise TlpersonaError(f"{path}: cannot load safely ({type(exc).__name__}: {exc})") from None


class SeedSource:
    """Centroids in the seed layout, behind the same read interface as :class:`Store`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        # a folder whose export was killed before its centroids is refused below, not skipped
        methods = sorted(p for p in self.root.glob("method_*") if (p / "all_centroids.pt").exists()
                         or (p / "metadata.json").is_file() and _metadata(p).get(MARK))
        if not methods:
            raise TlpersonaError(f"{self.root}: no method_<x>/all_centroids.pt found")
        self._cent: dict[str, torch.Tensor] = {}
        self._per_q: dict[str, torch.Tensor] = {}
        self.positions: list[str] = []
        personas: list[str] | None = None
        layers: list[int] | None = None
        shape: tuple[int, ...] | None = None
        # Folders that different exports wrote must not be read as one source.
        metas = {mdir: _metadata(mdir) for mdir in methods}
        sources = {mdir.name: m.get("source_manifest_hash") if m.get(MARK) else None
                   for mdir, m in metas.items()}
        if len(set(map(str, sources.values()))) > 1:
            raise TlpersonaError(f"{self.root}: method folders come from different sources "
                                 f"({', '.join(f'{k}: {v}' for k, v in sources.items())}); "
                                 "export each store into its own directory")
        digest = hashlib.sha256()
        for mdir in methods:
            alias = mdir.name[len("method_"):]
            if alias not in RECIPES:
                raise TlpersonaError(f"{mdir}: unknown method {alias!r} (known: {', '.join(RECIPES)})")
            meta = metas[mdir]
            if meta.get(MARK) and meta.get("complete") is False:
                raise TlpersonaError(f"{mdir}: the export that wrote it did not finish; "
                                     "rerun the export")
            pos = _position(alias, meta)
            data = _load_pt(mdir / "all_centroids.pt")
            if not isinstance(data, dict) or not data:
                raise TlpersonaError(f"{mdir / 'all_centroids.pt'}: expected a dict role -> tensor")
            names = check_persona_names(data, str(mdir / "all_centroids.pt"))
            if personas is None:
                personas = names
            elif set(names) != set(personas):
                raise TlpersonaError(f"{mdir}: its roles differ from the other methods'")
            cents = []
            for r in personas:
                cents.append(_tensor(data[r], f"{mdir / 'all_centroids.pt'}[{r!r}]", shape, 2))
                shape = tuple(cents[0].shape)
            assert shape is not None  # personas is never empty
            m_layers = _layers(meta, mdir / "metadata.json") or list(range(shape[0]))
            if len(m_layers) != shape[0]:
                raise TlpersonaError(f"{mdir}: metadata.json lists {len(m_layers)} layers, the "
                                     f"tensors have {shape[0]}")
            if layers is None:
                layers = m_layers
            elif m_layers != layers:
                raise TlpersonaError(f"{mdir}: its layers differ from the other methods'")
            self._cent[pos] = torch.stack(cents)
            per_q = [inside(mdir, mdir / f"{r}__per_q.pt") for r in personas]
            if all(p.exists() for p in per_q) and not parse_position(pos).question_invariant:
                rows = [_tensor(_load_pt(p), str(p), None, 3) for p in per_q]
                if any(tuple(t.shape[1:]) != shape for t in rows) or len({t.shape[0] for t in rows}) > 1:
                    raise TlpersonaError(f"{mdir}: per-question files disagree in shape with each "
                                         "other or with all_centroids.pt")
                self._per_q[pos] = torch.stack(rows)
            self.positions.append(pos)
            digest.update((mdir / "all_centroids.pt").read_bytes())
        assert personas is not None and layers is not None
        self.personas = personas
        self.layers = layers
        n_q = {t.shape[1] for t in self._per_q.values()}
        if len(n_q) > 1:
            raise TlpersonaError(f"{self.root}: per-question files disagree on the question count")
        self.questions = [str(i) for i in range(n_q.pop())] if n_q else []
        self.manifest_hash = digest.hexdigest()
        self.provenance = {"seed_layout": str(self.root)}

    def _name(self, position: str) -> str:
        name = canonical(position)
        if name not in self.positions:
            raise TlpersonaError(f"position {name} is not in {self.root}")
        return name

    def question_invariant(self, position: str) -> bool:
        return parse_position(self._name(position)).question_invariant

    def centroids(self, position: str) -> torch.Tensor:
        return self._cent[self._name(position)]

    def has_per_question(self, position: str) -> bool:
        return self._name(position) in self._per_q

    def per_question(self, position: str, layer: int | None = None) -> torch.Tensor:
        name = self._name(position)
        if name not in self._per_q:
            raise TlpersonaError(f"{name}: no per-question files in {self.root}")
        t = self._per_q[name]
        return t if layer is None else t[:, :, self.layer_index(layer)]

    def per_question_rows(self, position: str, start: int, stop: int) -> torch.Tensor:
        return self.per_question(position)[start:stop]

    def valid(self, position: str) -> torch.Tensor:
        return torch.ones(len(self.personas), len(self.questions), dtype=torch.bool)

    def n_tokens(self, position: str) -> torch.Tensor | None:
        return None

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise TlpersonaError(f"layer {layer} is not in {self.root} (it has {self.layers})")
        return self.layers.index(layer)


def read_seed(root: str | Path) -> SeedSource:
    return SeedSource(root)


#: A temporary file of :mod:`tlpersona.infra.files` that a killed export leaves (``.<name>.XXXXXXXX``).
_LEFTOVER = re.compile(r"\.(.+\.pt|metadata\.json)\.[a-z0-9_]{8}")


def _leftovers(mdir: Path) -> list[Path]:
    return [p for p in mdir.iterdir() if _LEFTOVER.fullmatch(p.name) and p.is_file()]


def _owned_by_export(mdir: Path) -> list[Path]:
    """The files an earlier export wrote in ``mdir`` (a killed one's temporary files too);
    refuses a folder that no export wrote."""
    leftovers = _leftovers(mdir)
    if not (mdir / "metadata.json").exists() and set(mdir.iterdir()) <= set(leftovers):
        return leftovers  # an export killed before its first file
    meta = _metadata(mdir)
    if not meta.get(MARK):
        raise TlpersonaError(f"{mdir} holds a seed layout that tlpersona did not write; export "
                             "into another directory")
    roles = meta.get("personas")
    if not isinstance(roles, list):
        raise TlpersonaError(f"{mdir / 'metadata.json'}: no persona list")
    names = check_persona_names(roles, str(mdir / "metadata.json"))
    files = ["all_centroids.pt", "metadata.json", *(f"{r}.pt" for r in names),
             *(f"{r}__per_q.pt" for r in names)]
    return [inside(mdir, mdir / f) for f in files if (mdir / f).is_file()] + leftovers


def _method_dirs(root: Path) -> list[Path]:
    dirs = sorted(root.glob("method_*")) if root.is_dir() else []
    for mdir in dirs:
        if mdir.is_symlink() or not mdir.is_dir():
            raise TlpersonaError(f"{mdir} is not a directory; export into another directory")
    return dirs


def check_seed_root(root: str | Path) -> None:
    """Problems with ``root`` as an export's seed layout, found before a store is read or
    anything written: a file, a store's directory (or inside one), method folders that no
    export wrote."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise TlpersonaError(f"`seed_layout` {root} is a file, not a directory")
    if in_store(root):
        raise TlpersonaError(f"`seed_layout` {root} is a store's directory; export elsewhere")
    for mdir in _method_dirs(root):
        _owned_by_export(mdir)


def export_seed(store: Store, root: str | Path) -> list[Path]:
    """Write a store's recipes in the seed layout (positions that have a recipe letter;
    ``method_b`` gets ``response_mean_seed`` where the store has it, see the module doc):
    ``all_centroids.pt`` {role: [layer, d]}, ``<role>.pt`` (that centroid), ``<role>__per_q.pt``
    ([question, layer, d], question-dependent recipes) and ``metadata.json`` with the layers,
    the personas and the store's manifest hash.

    Method folders already in ``root`` must have been written by an export (else nothing is
    touched); those from another store, or of an export that did not finish, are replaced
    whole, so the layout never mixes sources.
    """
    root = Path(root)
    check_seed_root(root)
    names = check_persona_names(store.personas, f"{store.root} (persona names)")
    stale: list[Path] = []
    for mdir in _method_dirs(root):
        owned = _owned_by_export(mdir)
        meta = _metadata(mdir)
        if meta.get("source_manifest_hash") != store.manifest_hash or meta.get("complete") is False:
            stale.extend(owned)
        else:
            stale.extend(_leftovers(mdir))
    for f in stale:  # another store's or a killed export: its files go, foreign files stay
        f.unlink()
    out = []
    for pos in store.positions:
        alias = "b" if pos == SEED_B else _BY_POSITION.get(pos)
        if alias is None or (pos == "response_mean" and SEED_B in store.positions):
            continue  # method_b holds the seed's span where the store has it
        mdir = inside(root, root / f"method_{alias}")
        meta = {MARK: 1, "layers": store.layers, "position": pos, "personas": names,
                "source": str(store.root), "source_manifest_hash": store.manifest_hash}
        # first: a kill from here on leaves a folder that says whose it is and that it is partial
        atomic_write_bytes(mdir / "metadata.json", json.dumps({**meta, "complete": False}).encode())
        cent = store.centroids(pos)
        atomic_save_pt(inside(mdir, mdir / "all_centroids.pt"),
                       {name: cent[i].clone() for i, name in enumerate(names)})
        per_q = None if store.question_invariant(pos) else store.per_question(pos)
        for i, name in enumerate(names):
            atomic_save_pt(inside(mdir, mdir / f"{name}.pt"), cent[i].clone())
            if per_q is not None:
                atomic_save_pt(inside(mdir, mdir / f"{name}__per_q.pt"), per_q[i].float().clone())
        atomic_write_bytes(mdir / "metadata.json", json.dumps({**meta, "complete": True}).encode())
        out.append(mdir)
    for mdir in sorted(root.glob("method_*")):
        if mdir not in out and mdir.is_dir() and not any(mdir.iterdir()):
            mdir.rmdir()
    return out
