"""Project personas, and new material, onto shared PCs or onto a persona axis.

A projection is per recipe and layer: ``coords = (x - mean) / scale @ basis.T`` where ``mean`` is
the recipe's mean centroid over the stored personas, ``scale`` its Frobenius norm when the PCs
were fitted with unit-norm recipes (else 1), and ``basis`` ``[k, d]`` either the top-k shared PCs
or one unit axis. The default axis is the assistant axis: the ``assistant`` persona's centroid
minus the mean of the other personas' centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tlpersona.analyses import metrics as M
from tlpersona.cache.vectors import axis as persona_axis
from tlpersona.errors import TlpersonaError


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
