"""The held-out shared-PC test's numbers, shared by the plain and the rotation-aligned subspace:
centring, the per-PC agreement of recipe pairs on held-out personas, the label-permutation test
of each PC (an intersection-union over pairs), the count k found, Holm over layers, and the
personas' scores on the shared PCs (:mod:`tlpersona.analyses.subspace` describes the method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.decomposition import PCA

from tlpersona.analyses import metrics as M
from tlpersona.analyses.stats import holm
from tlpersona.cache.source import ActivationSource


@dataclass
class Centring:
    """What a recipe is centred and scaled with: fitted on some personas, applied to any."""

    mean: np.ndarray  # [d]
    scale: float

    @classmethod
    def fit(cls, x: np.ndarray, unit_norm: bool) -> Centring:
        mean = x.mean(axis=0)
        norm = float(np.linalg.norm(x - mean))
        return cls(mean, 1.0 / norm if unit_norm and norm > 0 else 1.0)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) * self.scale

def prepare(x: np.ndarray, unit_norm: bool) -> np.ndarray:
    """``x`` centred over its personas (and scaled to unit Frobenius norm if ``unit_norm``)."""
    return Centring.fit(x, unit_norm).apply(x)

def agreement_curve(mats: dict[str, np.ndarray], components: np.ndarray,
                    pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For K = 2 … len(components): per pair, per-persona cos (mean, min) and cosine-matrix
    Pearson r of the (already centred) recipes projected onto the top-K components (``[K, d]``).
    The rows are not re-centred, so held-out rows keep the fit half's centring."""
    out = []
    for k in range(2, components.shape[0] + 1):
        proj = {p: m @ components[:k].T for p, m in mats.items()}
        # each recipe's cosine matrix once per K (a recipe is in several pairs)
        tri = {p: M.upper(M.cos_matrix(x)) for p, x in proj.items()}
        row: dict[str, Any] = {"k": k, "pairs": {}}
        for x, y in pairs:
            cos = M.rowwise_cos(proj[x], proj[y])
            r = M.pearson(tri[x], tri[y]) if len(cos) > 2 else float("nan")
            row["pairs"][f"{x}~{y}"] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                                        "mc_r": r}
        out.append(row)
    return out

def _passes(row: dict[str, Any], min_cos: float, min_r: float) -> bool:
    return all(v["cos_min"] > min_cos and v["mc_r"] > min_r for v in row["pairs"].values())

def k_largest_passing(curve: list[dict[str, Any]], min_cos: float, min_r: float) -> int | None:
    """Largest K (≥ 2) at which every pair keeps min cos and matrix r above the thresholds."""
    passing = [row["k"] for row in curve if _passes(row, min_cos, min_r)]
    return max(passing) if passing else None

def agreement_from_scores(scores: dict[str, np.ndarray], pairs: list[tuple[str, str]]
                          ) -> list[dict[str, Any]]:
    """For each shared PC alone: per pair, the Pearson r across personas of the two recipes'
    scores on it (``scores[p]``: ``[persona, PC]``; NaN where it is undefined)."""
    units = {p: unit_columns(s) for p, s in scores.items()}
    width = min((s.shape[1] for s in scores.values()), default=0)
    return [{"pc": j + 1, "pairs": {f"{x}~{y}": float(units[x][:, j] @ units[y][:, j])
                                    for x, y in pairs}} for j in range(width)]

def per_pc_agreement(mats: dict[str, np.ndarray], components: np.ndarray,
                     pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each shared PC alone: per pair, the Pearson r across personas of the two recipes'
    scores on it. A PC both recipes share orders the personas alike (r near 1); a direction
    only one recipe varies along gives r near 0 whatever its variance."""
    return agreement_from_scores({p: m @ components.T for p, m in mats.items()}, pairs)

def unit_columns(x: np.ndarray) -> np.ndarray:
    """``x`` ``[persona, PC]`` with each column centred and scaled to unit norm, so that the dot
    product of two such columns is their Pearson r; NaN columns where r is undefined (constant,
    or fewer than 3 personas)."""
    c = x - x.mean(axis=0)
    norm = np.linalg.norm(c, axis=0)
    ok = (norm > 0) & (x.shape[0] > 2)
    return np.where(ok, c / np.where(ok, norm, 1.0), np.nan)

#: family-wise level of k_found over the layers of a run (and of the report's "beyond chance")
ALPHA = 0.05

#: measured power, quoted by the report (benchmarks/subspace_power.py)
POWER_NOTE = "5 ± 1 found at 88 % of layers at 26 personas, 97 % at 40"

#: the fewest label permutations the default draws (see :func:`perm_count`)
MIN_PERMUTATIONS = 2000

#: a permuted r counts as reaching the data's when within this (float ties of equal orderings)
TIE = 1e-12

def pc_level(n_layers: int) -> float:
    """The level each layer's per-PC tests run at: :data:`ALPHA` split over the layers
    (Bonferroni), so that a layer is called at any layer of the run with probability ≤ ALPHA
    when no pair shares. Within a layer no further split is needed: the PCs are tested in their
    fixed order and counting stops at the first that fails."""
    return ALPHA / max(n_layers, 1)

def draws_needed(n_layers: int) -> int:
    """The fewest permutations at which a PC can pass at :func:`pc_level`: the smallest p,
    1 / (permutations + 1), must be below ALPHA / layers (80 at 4 layers, 20 at one)."""
    return int(np.floor(max(n_layers, 1) / ALPHA + 1e-9))

def perm_count(n_layers: int, requested: int | None) -> int:
    """Label permutations behind each pair's per-PC p. By default 20 × :func:`draws_needed`,
    at least :data:`MIN_PERMUTATIONS`: at the floor a PC passes only if no permutation reaches
    it in any pair, which costs power; a ``requested`` count is raised to draws_needed."""
    need = draws_needed(n_layers)
    return max(MIN_PERMUTATIONS, 20 * need) if requested is None else max(requested, need)

def label_permutations(n_scored: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random orderings of the held-out personas ``[count, n_scored]``."""
    return rng.permuted(np.tile(np.arange(n_scored), (count, 1)), axis=1)

def pass_threshold(draws: np.ndarray, level: float) -> np.ndarray:
    """Per column, the value a statistic must exceed to have p < ``level`` against ``draws``
    ``[draw, column]``: the c-th largest draw, c = ⌈level · (draws + 1)⌉ − 1 (+inf when c = 0: it
    cannot pass; −inf when every draw may tie or beat it)."""
    n = draws.shape[0]
    c = int(np.ceil(level * (n + 1) * (1 - 1e-12))) - 1
    if c < 1:
        return np.full(draws.shape[1], np.inf)
    if c > n:
        return np.full(draws.shape[1], -np.inf)
    return -np.sort(-draws, axis=0)[c - 1]

def pair_test(x: np.ndarray, y: np.ndarray, perms: np.ndarray, level: float
              ) -> tuple[float, float]:
    """One pair on one PC: ``x``, ``y`` the two recipes' unit score columns ``[persona]``.
    Returns the permutation p of their r (``y``'s personas relabelled by each row of
    ``perms``) and the r it must exceed for p < ``level`` (+inf: it cannot)."""
    if np.isnan(x).any() or np.isnan(y).any():
        return 1.0, np.inf
    null = y[perms] @ x  # [permutation]
    p = (1 + np.count_nonzero(null >= x @ y - TIE)) / (len(null) + 1)
    return float(p), float(pass_threshold(null[:, None], level)[0])

@dataclass
class PCCount:
    """``k_found`` of a layer by the per-PC intersection–union test."""

    k: int | None
    per_pc_p: list[float]  # per PC, its p: the largest pair p
    per_pc_pair_p: list[dict[str, float]]  # per PC, each pair's permutation p
    # per PC, the largest r a pair must exceed (a PC whose smallest pair r exceeds it passes;
    # each pair is held to its own bar); None: no pair can pass
    per_pc_threshold: list[float | None]

    @property
    def p(self) -> float | None:
        """The layer's call (k ≥ 1): PC1's p; None when nothing was found."""
        return self.per_pc_p[0] if self.k else None

def count_shared(scores: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                 perms: np.ndarray, level: float, full: bool = True) -> PCCount:
    """k_found: the leading PCs on which every pair's held-out r beats its label permutations at
    p < ``level`` (strictly: a layer's k_found ≥ 1 then has its Holm p below ALPHA too).
    ``scores[p]``: ``[held-out persona, PC]``. Without ``full``, stops at the first PC that
    fails (the relabelled draws need only their count)."""
    units = {p: unit_columns(s) for p, s in scores.items()}
    width = min((s.shape[1] for s in scores.values()), default=0)
    k, ps, pair_ps, bars = 0, [], [], []
    for j in range(width):
        tests = {f"{x}~{y}": pair_test(units[x][:, j], units[y][:, j], perms, level)
                 for x, y in pairs}
        p = max(t[0] for t in tests.values())
        bar = max(t[1] for t in tests.values())
        ps.append(p)
        pair_ps.append({name: t[0] for name, t in tests.items()})
        bars.append(bar if np.isfinite(bar) else None)
        passed = p * (1 + 1e-12) < level
        if passed and k == j:  # the count stops at the first PC that fails
            k += 1
        if not (passed or full):
            break
    return PCCount(k or None, ps, pair_ps, bars)

def pc_statistic(per_pc: list[dict[str, Any]]) -> np.ndarray:
    """Per PC, the smallest held-out r over the recipe pairs ``[PC]`` (an undefined r counts as
    the lowest possible): the agreement the report quotes against ``per_pc_threshold``."""
    out = np.array([min(row["pairs"].values()) if row["pairs"] else np.nan for row in per_pc],
                   dtype=np.float64)
    return np.where(np.isnan(out), -np.inf, out)

def null_p(found: int | None, null: list[int | None]) -> float | None:
    """(1 + #relabelled draws reaching ``found``) / (draws + 1); None when nothing was found or
    no draw was run (descriptive: what a recipe made unrelated reaches)."""
    if not found or not null:
        return None
    return (1 + sum((k or 0) >= found for k in null)) / (len(null) + 1)

def layer_holm(ps: list[float | None], null_ps: list[float | None], drawn: list[bool]
               ) -> tuple[list[float], list[float | None]]:
    """Each layer's call p (``ps``; None: nothing found) and descriptive relabelled p
    (``null_ps``, where ``drawn`` says draws were run) Holm-adjusted over every layer of the run
    (one family: "the recipes share a subspace at this layer"). A layer that found nothing stays
    in the family with p = 1: leaving it out would test the others at a level the run never
    paid for. For the relabelled draws, layers without them are not in the family (None)."""

    calls = holm([1.0 if p is None else p for p in ps])
    nulls = holm([np.nan if not d else 1.0 if p is None else p
                  for p, d in zip(null_ps, drawn, strict=True)])
    return ([float(a) for a in calls], [None if np.isnan(a) else float(a) for a in nulls])

def holm_over_layers(layers: list[dict[str, Any]]) -> None:
    """:func:`layer_holm` on layers as subspace.json holds them: adds ``k_found_p_holm`` (the
    call) and ``k_found_null_p_holm`` (descriptive) to each layer's dict."""
    calls, nulls = layer_holm([lay["k_found_p"] for lay in layers],
                              [lay["k_found_null_p"] for lay in layers],
                              [bool(lay["k_found_null"]) for lay in layers])
    for lay, adj, adj_null in zip(layers, calls, nulls, strict=True):
        lay["k_found_p_holm"] = adj
        lay["k_found_null_p_holm"] = adj_null

def k_found(per_pc: list[dict[str, Any]], min_r: float) -> int | None:
    """How many of the shared PCs every recipe pair orders personas alike on (r > ``min_r``):
    the dimension of the subspace the recipes share. None if no PC is shared."""
    n = sum(all(r > min_r for r in row["pairs"].values()) for row in per_pc)
    return n or None

def top_components(x: np.ndarray, k: int) -> np.ndarray:
    """The top ``k`` principal directions ``[k, d]`` of the rows of ``x`` ``[n, d]`` (centred
    first), as sklearn's full-SVD PCA gives them up to sign. With fewer rows than dimensions they
    come from the ``n × n`` Gram matrix: the null reruns this hundreds of times at 275 personas ×
    d 3584, where it is ~6× faster than the SVD; where the top ``k`` are not all of full rank,
    the SVD decides."""
    c = x - x.mean(axis=0)
    n, d = c.shape
    if n < d:
        w, u = np.linalg.eigh(c @ c.T)
        order = np.argsort(w)[::-1][:k]
        s = np.sqrt(np.clip(w[order], 0.0, None))
        if s.size == k and s[0] > 0 and s[-1] > s[0] * 1e-6:
            return ((c.T @ u[:, order]) / s).T
    return PCA(n_components=k, svd_solver="full").fit(x).components_

def pc_scores(source: ActivationSource, positions: list[str], components: dict[int, np.ndarray],
              unit_norm: bool) -> dict[int, dict[str, np.ndarray]]:
    """Per layer of ``components`` and recipe, the personas' scores on the first two shared PCs
    ``[persona, 2]`` (centred, and scaled as the PCA was fitted)."""
    out = {}
    for layer, comp in components.items():
        li = source.layer_index(layer)
        out[layer] = {p: prepare(source.centroids(p)[:, li].double().numpy(), unit_norm)
                      @ comp[:2].T for p in positions}
    return out
