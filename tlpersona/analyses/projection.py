"""Project personas, and new material, onto shared PCs or onto a persona axis.

A projection is per recipe and layer: ``coords = (x - mean) / scale @ basis.T`` where ``mean`` is
the recipe's mean centroid over the stored personas, ``scale`` its Frobenius norm when the PCs
were fitted with unit-norm recipes (else 1), and ``basis`` ``[k, d]`` either the top-k shared PCs
or one unit axis. The default axis is the assistant axis: the ``assistant`` persona's centroid
minus the mean of the other personas' centroids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlpersona.analyses import metrics as M
from tlpersona.cache.vectors import axis as persona_axis
from tlpersona.data import Inputs
from tlpersona.errors import TlpersonaError
from tlpersona.infra.resultjson import Reader
from tlpersona.infra.resultsets import read_result, results_set
from tlpersona.version import __version__


@dataclass
class Frame:
    """One recipe's coordinate frame at one layer."""

    mean: np.ndarray  # [d]
    scale: float
    basis: np.ndarray  # [k, d], orthonormal rows
    names: list[str]  # coordinate names

    def coords(self, x: np.ndarray) -> np.ndarray:
        """``[n, d]`` → ``[n, k]``."""
        return ((x - self.mean) / self.scale) @ self.basis.T


def pc_frame(cent: np.ndarray, components: np.ndarray, k: int, unit_norm: bool) -> Frame:
    """Frame of the top-``k`` shared PCs for one recipe's stored centroids ``[persona, d]``."""
    mean = cent.mean(0)
    scale = float(np.linalg.norm(cent - mean)) if unit_norm else 1.0
    return Frame(mean, scale, components[:k], [f"PC{i + 1}" for i in range(k)])


def axis_frame(cent: np.ndarray, personas: list[str], persona: str) -> Frame:
    """Frame of one axis: ``persona``'s centroid minus the mean of the others (unit length)."""
    if persona not in personas:
        raise TlpersonaError(f"persona {persona!r} is not in the store; cannot build its axis")
    i = personas.index(persona)
    axis = persona_axis(torch.from_numpy(cent), i).numpy()
    norm = np.linalg.norm(axis)
    if norm == 0:
        raise TlpersonaError(f"the {persona} axis is zero")
    return Frame(cent.mean(0), 1.0, (axis / norm)[None], [f"{persona} axis"])


@dataclass(frozen=True)
class Nearest:
    """A new item's nearest stored personas, and whether it is closer to them than one more
    persona would be.

    ``top``: (persona, cosine) closest first, both centred on the stored mean. ``rank``: where the
    item's top cosine falls among the n + 1 top cosines of the pool "stored personas + the item",
    each member against the other n, centred on their mean (1 = closest; ties count against the
    item). Under the null that the item is one more persona, exchangeable with the stored ones,
    ``p = rank / (n + 1)`` exactly — provided the item is made as a stored centroid is
    (``exact``: the store's questions averaged, one phrasing, or a recipe that does not read the
    question); an item averaged over other or fewer questions differs from every stored persona
    by that alone in recipes that read the question (on planted data, one question against 12
    stored gave rank 1 at 1.8 times its rate). A near-copy of stored persona P makes P's top
    cosine high too (P's nearest is the item), so it reaches rank 1 or 2: with 26 personas
    p = 0.037 or 0.074.
    """

    top: list[tuple[str, float]]
    rank: int
    pool: int  # n + 1
    p_holm: float | None = None  # ``p`` Holm-adjusted over the run's new items × recipes
    tests: int = 1  # the size of that family
    exact: bool = True  # the item was built as the stored centroids are (see above)

    @property
    def p(self) -> float:
        return self.rank / self.pool

    def text(self, alpha: float = 0.05) -> str:
        """The nearest stored personas and what the rank supports, in one line."""
        near = ", ".join(f"{n} ({c:.2f})" for n, c in self.top[:3])
        held = self.p if self.p_holm is None else self.p_holm
        return (f"{near}; {_closer(held, self.tests / self.pool, self.pool, self.tests, alpha)} "
                f"(rank {self.rank} of {self.pool} top cosines, p = {self.p:.3f}, "
                f"Holm {held:.3f}){'' if self.exact else NOT_EXACT}")


#: Said of a p whose item was not built as the stored centroids are.
NOT_EXACT = ("; p not exact: the item was not built as the stored centroids are (the store's "
             "questions, one phrasing)")


def _closer(p: float, floor: float, pool: int, tests: int, alpha: float) -> str:
    if p < alpha:
        return "closer to its nearest than one more persona would be"
    if floor >= alpha:
        return (f"cannot be shown closer than one more persona with {pool - 1} personas and "
                f"{tests} tests (Holm p >= {floor:.3f})")
    return "not shown to be closer to its nearest than one more persona"


@dataclass(frozen=True)
class Combined:
    """One new item's test over every recipe it was read with: each pool member's top cosine
    (as in :class:`Nearest`) averaged over the recipes, and the item's average ranked among
    the n + 1. Exact under the same null, all recipes jointly (the item is one more persona in
    every recipe at once), with a floor of 1 / (n + 1) per item instead of recipes / (n + 1)
    under Holm over recipes: reachable at 0.05 from 20 personas. ``p_holm``: Holm over the
    run's new items."""

    label: str
    recipes: list[str]
    rank: int
    pool: int
    p_holm: float | None = None
    tests: int = 1
    exact: bool = True

    @property
    def p(self) -> float:
        return self.rank / self.pool

    def text(self, alpha: float = 0.05) -> str:
        held = self.p if self.p_holm is None else self.p_holm
        return (f"{self.label} over {len(self.recipes)} recipe(s): "
                f"{_closer(held, self.tests / self.pool, self.pool, self.tests, alpha)} "
                f"(combined rank {self.rank} of {self.pool}, p = {self.p:.3f}, Holm {held:.3f})"
                f"{'' if self.exact else NOT_EXACT}")


def top_cosines(x: np.ndarray, cent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the pool "``cent`` ``[n, d]`` + ``x``": each member's top cosine against the other n,
    centred on their mean ``[n + 1]`` (the item last), and the item's cosines to the stored
    personas ``[n]``."""
    if len(cent) < 2:
        raise TlpersonaError(f"nearest personas need at least 2 stored personas, not {len(cent)}")
    pool = np.vstack([cent, x[None]])
    n1 = len(pool)
    # member j against the others, centred on the others' mean: (sum - x_j) / n
    others_mean = (pool.sum(0)[None] - pool) / (n1 - 1)
    best = np.empty(n1)
    for j in range(n1):
        cos = M.unit(np.delete(pool, j, 0) - others_mean[j]) @ M.unit((pool[j] - others_mean[j])[None])[0]
        best[j] = cos.max()
    return best, cos


def pool_rank(best: np.ndarray) -> int:
    """The item's (last member's) rank among ``best``, ties counted against it."""
    return int((best >= best[-1]).sum())


def nearest(x: np.ndarray, cent: np.ndarray, personas: list[str], top: int = 5,
            exact: bool = True) -> Nearest:
    """Stored personas closest to ``x`` ``[d]`` by cosine (``cent`` ``[n, d]``), with the
    exchangeability rank of its top cosine (:class:`Nearest`)."""
    best, cos = top_cosines(x, cent)
    order = np.argsort(-cos)[:top]
    return Nearest([(personas[i], float(cos[i])) for i in order], pool_rank(best), len(best),
                   exact=exact)


def combined(label: str, items: dict[str, np.ndarray], cents: dict[str, np.ndarray],
             exact: bool = True) -> Combined:
    """:class:`Combined` for one item read with several recipes: ``items`` recipe → ``[d]``,
    ``cents`` recipe → the stored centroids ``[n, d]`` (the same personas in every recipe)."""
    best = np.mean([top_cosines(x, cents[r])[0] for r, x in items.items()], axis=0)
    return Combined(label, list(items), pool_rank(best), len(best), exact=exact)


@dataclass(frozen=True)
class Projected:
    """One stored persona or new item in a projection frame. New items only: ``nearest``, the
    stored personas closest to it and the rank test of its top cosine, Holm-adjusted over every
    new item × recipe of the run (:class:`Nearest`)."""

    label: str
    recipe: str
    coords: dict[str, float]  # axis name -> coordinate
    stored: bool
    nearest: Nearest | None = None
    text: str = ""  # a new item's system prompt, conversation system message or raw text
    questions: list[str] = field(default_factory=list)  # what a new item was asked (averaged)


#: projection.json's keys and their types: a stored persona, and a new item (its
#: :class:`Nearest` flattened into ``nearest_*``; ``nearest_p`` is rank / pool, recomputed)
_STORED = {"persona": str, "coords": dict[str, float]}
_ITEM = {"label": str, "recipe": str, "text": str, "questions": list[str],
         "coords": dict[str, float], "nearest": list[Any], "nearest_rank": int,
         "nearest_pool": int, "nearest_p": float, "nearest_p_holm": float | None,
         "nearest_tests": int, "nearest_exact": bool}


@dataclass(frozen=True)
class ProjectionResult:
    """What :func:`tlpersona.project` computed; ``.to_dict()`` is projection.json."""

    store: str
    layer: int
    axis: str
    positions: list[str]
    axes: list[str]  # coordinate names (PC1 …, or the persona axis)
    points: list[Projected]
    inputs: Inputs  # the store's model, personas and questions, and its manifest
    # per new item, its rank test over every recipe at once, Holm over the items
    combined: list[Combined] = field(default_factory=list)
    code_version: str = field(default=__version__, repr=False)  # the version that computed it

    def to_frame(self) -> Any:
        """One row per point (a stored persona or a new item) and recipe, with its coordinates,
        as a pandas DataFrame."""
        from tlpersona.infra.resultjson import frame

        return frame(self.points)

    @classmethod
    def load(cls, path: str | Path) -> ProjectionResult:
        """A saved projection: ``path`` is its projection.json or the directory holding it."""
        file, data = read_result(path, "projection")
        reader = Reader(file, data.get("code_version"))
        f = reader.object(data, "", {
            "store": str, "inputs": Inputs, "layer": int, "axis": str, "positions": list[str],
            "stored": dict[str, list[Any]], "items": list[Any], "combined": list[Combined],
            "code_version": str})
        points = []
        for recipe, rows in f["stored"].items():
            for i, row in enumerate(rows):
                s = reader.object(row, f"stored[{recipe!r}][{i}]", _STORED)
                points.append(Projected(s["persona"], recipe, s["coords"], True))
        for i, row in enumerate(f["items"]):
            at = f"items[{i}]"
            it = reader.object(row, at, _ITEM)
            top = [(n["persona"], n["cos"]) for j, nr in enumerate(it["nearest"])
                   for n in [reader.object(nr, f"{at}.nearest[{j}]",
                                           {"persona": str, "cos": float})]]
            near = Nearest(top, it["nearest_rank"], it["nearest_pool"], it["nearest_p_holm"],
                           it["nearest_tests"], it["nearest_exact"])
            points.append(Projected(it["label"], it["recipe"], it["coords"], False, near,
                                    it["text"], it["questions"]))
        # the coordinate names, in the frame's order (every point has them all)
        axes = list(points[0].coords) if points else []
        return cls(f["store"], f["layer"], f["axis"], f["positions"], axes, points, f["inputs"],
                   f["combined"], f["code_version"])

    def to_dict(self) -> dict[str, Any]:
        stored: dict[str, list[dict[str, Any]]] = {p: [] for p in self.positions}
        items = []
        for pt in self.points:
            if pt.stored:
                stored[pt.recipe].append({"persona": pt.label, "coords": dict(pt.coords)})
            else:
                near = pt.nearest
                assert near is not None
                items.append({"label": pt.label, "recipe": pt.recipe, "text": pt.text,
                              "questions": list(pt.questions), "coords": dict(pt.coords),
                              "nearest": [{"persona": n, "cos": c} for n, c in near.top],
                              "nearest_rank": near.rank, "nearest_pool": near.pool,
                              "nearest_p": near.p, "nearest_p_holm": near.p_holm,
                              "nearest_tests": near.tests, "nearest_exact": near.exact})
        return {"store": self.store, "inputs": asdict(self.inputs), "layer": self.layer,
                "axis": self.axis, "positions": list(self.positions), "stored": stored,
                "items": items,
                "combined": [{"label": c.label, "recipes": list(c.recipes), "rank": c.rank,
                              "pool": c.pool, "p": c.p, "p_holm": c.p_holm, "tests": c.tests,
                              "exact": c.exact} for c in self.combined],
                "code_version": self.code_version}

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """projection.json, projection.csv and projection.png into ``out`` (one set, swapped in
        whole; earlier results there only with ``overwrite``); returns the JSON's path."""
        from tlpersona.report.projection import write_projection

        with results_set(out, "projection", overwrite) as stage:
            write_projection(self, stage)
        return Path(out) / "projection.json"
