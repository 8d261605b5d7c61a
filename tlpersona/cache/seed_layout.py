"""The seed experiment's on-disk layout, for users with older code and results.

::

    DIR/method_<a|b|bstar|bstar_no_last|c1|c2|c3>/all_centroids.pt   {role: [n_layers, d]}
    DIR/method_<x>/<role>__per_q.pt                                  [n_questions, n_layers, d]
    DIR/method_<x>/metadata.json                                     {"layers": [...], ...}

``.pt`` files are read with ``torch.load(weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tlpersona.cache.store import Store
from tlpersona.errors import TlpersonaError
from tlpersona.files import atomic_write_bytes
from tlpersona.positions import RECIPES, canonical, parse_position

_BY_POSITION = {v: k for k, v in RECIPES.items()}


def _load_pt(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unsafe or corrupt files
        raise TlpersonaError(f"{path}: cannot load safely ({type(exc).__name__}: {exc})") from None


class SeedSource:
    """Centroids in the seed layout, behind the same read interface as :class:`Store`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        methods = sorted(p for p in self.root.glob("method_*") if (p / "all_centroids.pt").exists())
        if not methods:
            raise TlpersonaError(f"{self.root}: no method_<x>/all_centroids.pt found")
        self._cent: dict[str, torch.Tensor] = {}
        self._per_q: dict[str, torch.Tensor] = {}
        self.positions: list[str] = []
        personas: list[str] | None = None
        layers: list[int] | None = None
        digest = hashlib.sha256()
        for mdir in methods:
            alias = mdir.name[len("method_"):]
            if alias not in RECIPES:
                raise TlpersonaError(f"{mdir}: unknown method {alias!r} (known: {', '.join(RECIPES)})")
            pos = RECIPES[alias]
            data = _load_pt(mdir / "all_centroids.pt")
            if not isinstance(data, dict) or not data:
                raise TlpersonaError(f"{mdir / 'all_centroids.pt'}: expected a dict role -> tensor")
            names = list(data)
            if personas is None:
                personas = names
            elif set(names) != set(personas):
                raise TlpersonaError(f"{mdir}: its roles differ from the other methods'")
            meta_path = mdir / "metadata.json"
            n_layers = next(iter(data.values())).shape[0]
            m_layers = (json.loads(meta_path.read_text()).get("layers")
                        if meta_path.exists() else None) or list(range(n_layers))
            if layers is None:
                layers = [int(x) for x in m_layers]
            elif [int(x) for x in m_layers] != layers:
                raise TlpersonaError(f"{mdir}: its layers differ from the other methods'")
            self._cent[pos] = torch.stack([torch.as_tensor(data[r]).float() for r in personas])
            per_q = [mdir / f"{r}__per_q.pt" for r in personas]
            if all(p.exists() for p in per_q) and not parse_position(pos).question_invariant:
                self._per_q[pos] = torch.stack([torch.as_tensor(_load_pt(p)).float() for p in per_q])
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


def _save_pt(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def export_seed(store: Store, root: str | Path) -> list[Path]:
    """Write a store's recipes in the seed layout (positions that have a recipe letter):
    ``all_centroids.pt`` {role: [layer, d]}, ``<role>.pt`` (that centroid), ``<role>__per_q.pt``
    ([question, layer, d], question-dependent recipes) and ``metadata.json`` with the layers."""
    out = []
    root = Path(root)
    for pos in store.positions:
        alias = _BY_POSITION.get(pos)
        if alias is None:
            continue
        mdir = root / f"method_{alias}"
        mdir.mkdir(parents=True, exist_ok=True)
        cent = store.centroids(pos)
        _save_pt({name: cent[i].clone() for i, name in enumerate(store.personas)},
                 mdir / "all_centroids.pt")
        per_q = None if store.question_invariant(pos) else store.per_question(pos)
        for i, name in enumerate(store.personas):
            _save_pt(cent[i].clone(), mdir / f"{name}.pt")
            if per_q is not None:
                _save_pt(per_q[i].float().clone(), mdir / f"{name}__per_q.pt")
        meta = {"layers": store.layers, "position": pos, "source": str(store.root)}
        atomic_write_bytes(mdir / "metadata.json", json.dumps(meta).encode())
        out.append(mdir)
    return out
