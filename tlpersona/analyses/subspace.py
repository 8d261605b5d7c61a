"""A persona subspace shared by every recipe: one PCA fitted on all recipes' centroids.

Per layer, each recipe's centroids ``[persona, d]`` are mean-centred across personas and, by
default, scaled to unit total variance (so the PCA ranks directions by how many recipes share
them, not by which recipe has the largest norm); the recipes are stacked into
``[recipe × persona, d]`` and one PCA gives the shared PCs.

``k_found`` counts the leading shared PCs on which every pair of recipes orders the personas
alike beyond chance. It is held out: the centring, the scaling and the PCA are fitted on half of
the personas, the scores taken on the other half, and only the first n_fit − 1 PCs are counted.
Per PC and recipe pair (X, Y), the statistic is the Pearson r between X's and Y's held-out
scores on that PC, and its p is a permutation p: Y's held-out persona labels are permuted with
everything fitted (centring, scale, PCs) held fixed, p = (1 + #permutations with r ≥ the data's)
/ (permutations + 1). The PCs never saw the held-out personas, so when X and Y are unrelated
their held-out scores are independent and the labels exchangeable: each pair's p is exact. The
claim "every pair shares this PC" is an intersection–union test: the PC's p is the largest pair
p, valid at the level with no correction over pairs (it is rejected only if every pair's own
null is). The PCs come in a fixed order, so k_found counts them in that order at one level,
:func:`pc_level` = :data:`ALPHA` / layers, stopping at the first that fails; a layer's call
(k_found ≥ 1) has p ``k_found_p`` (PC1's p; 1 where nothing was found), Holm-adjusted over every
requested layer into ``k_found_p_holm``. So unrelated recipes, or recipes only some of which
share a geometry, give a called layer anywhere in the run with probability ≤ ALPHA. The count
beyond 1 is descriptive: once PC1 is shared, its estimation error reaches the next PCs'
held-out scores. The permutations (:func:`perm_count`: 20 × layers / ALPHA, at least 2,000,
seeded) are the same at every layer and for every pair. A direction only one recipe varies
along scores r near 0 whatever its variance. The fixed r > ``min_r`` rule remains for what has no
test: ``k_found_in_sample`` (every persona fitted and scored).

The relabelled draws (``n_null``) are descriptive: each reruns the held-out procedure, PCA
included, after relabelling the last recipe's personas, and its k_found is counted by the same
test; ``k_found_null`` lists them and ``k_found_null_p`` = (1 + #draws reaching k_found) /
(draws + 1) (Holm over layers: ``k_found_null_p_holm``). They show what a recipe made unrelated
reaches; they no longer decide anything. Testing the data's smallest r over the pairs against
such draws, as before, is not valid with three or more recipes of which only some share a
geometry: the draws break every pair, the data only some (measured in
``tests/test_subspace_iut.py``). When all countable PCs pass, ``k_found_saturated`` says the
subspace may be larger than the personas can show.

Descriptive curves: for K = 2 … k_max every recipe is projected onto the top-K shared PCs and
the pairs are scored there (per-persona cosine, cosine-matrix Pearson r; ``k_largest_passing``
is the largest K with min cos > 0.85 and r > 0.90). K = 1 is not scored: a 1-D projection makes
every per-persona cosine ±1.

``align="procrustes"`` adds, per layer, the same held-out ``k_found`` (same test, same
permutations, its relabelled draws and in-sample value) for recipes rotated onto the first one
before the PCA (:mod:`tlpersona.analyses.aligned`): it finds a persona geometry that every recipe
has in its own rotated basis, which the plain joint PCA misses.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, replace
from typing import Any

import numpy as np
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from tlpersona.analyses import metrics as M
from tlpersona.analyses.subspace_result import (
    CurvePair,
    CurveRow,
    HeldOutSplit,
    KFound,
    ManifestRef,
    NullDraws,
    PCAgreement,
    RecipeVariance,
    SubspaceLayer,
    SubspaceResult,
    SubspaceThresholds,
)
from tlpersona.cache.source import ActivationSource
from tlpersona.chat.positions import canonical
from tlpersona.errors import TlpersonaError
from tlpersona.infra.renames import old_names, take_old_names
from tlpersona.version import __version__


@old_names({"n_null": "null_draws", "n_perm": "permutations"})
@dataclass
class SubspaceConfig:
    """What :func:`subspace` computes; ``null_draws`` and ``permutations`` are the names the API
    takes (``n_null`` and ``n_perm``, their earlier names, still read and set them for one
    release)."""

    positions: list[str] | None = None
    layers: list[int] | None = None
    k_max: int = 50
    unit_norm: bool = True
    min_cos: float = 0.85
    min_r: float = 0.90
    seed: int = 0
    # relabelled reruns behind the descriptive k_found null (0 runs none); the test does not
    # need them
    null_draws: int = 100
    # label permutations behind each pair's per-PC p; None: perm_count's default
    permutations: int | None = None
    align: str = "none"  # "procrustes": also the rotation-aligned subspace (analyses.aligned)
    n_null: InitVar[int | None] = None
    n_perm: InitVar[int | None] = None

    def __post_init__(self, n_null: int | None, n_perm: int | None) -> None:
        if n_perm is not None and n_perm < 1:  # named as it was given
            raise TlpersonaError(f"`n_perm` must be at least 1, got {n_perm}")
        take_old_names(self, {"n_null": n_null, "n_perm": n_perm})


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
    from tlpersona.analyses.stats import holm

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


def found_text(found: KFound) -> str:
    """A layer's k_found as the report states it: the count (``≥`` when every countable PC is
    shared), and whether the layer is called after Holm over every layer."""
    k = found.k
    if not k:
        return "none"
    text = f"≥ {k} (every countable PC shared)" if found.saturated else str(k)
    p = found.p_holm
    return f"{text}, {'beyond' if p < ALPHA else 'not beyond'} chance (Holm p = {p:.2g})"


def null_text(found: KFound | Mapping[str, Any]) -> str:
    """The relabelled draws' k_found values, compressed (``none ×93, 1 ×7``), and their p.
    ``found``: a :class:`KFound`, or a layer as subspace.json holds it."""
    null, null_p = ((found.null, found.null_p) if isinstance(found, KFound)
                    else (found["k_found_null"], found["k_found_null_p"]))
    counts: dict[str, int] = {}
    for k in null:
        key = "none" if k is None else str(k)
        counts[key] = counts.get(key, 0) + 1
    text = ", ".join(f"{key} ×{n}" for key, n in sorted(counts.items(), key=_null_order))
    if null_p is not None:
        text += f" (p = {null_p:.3f})"
    return text or "—"


def _null_order(item: tuple[str, int]) -> tuple[int, int]:
    return (0, 0) if item[0] == "none" else (1, int(item[0]))


def limits_text(n_perm: int, n_layers: int, n_scored: int) -> str:
    """What the k_found column can and cannot say with these permutations and personas."""
    level = pc_level(n_layers)
    text = (f"Each pair's p comes from {n_perm} label permutations (smallest p "
            f"{1 / (n_perm + 1):.2g}, below the per-PC level {level:.3g}).")
    # a permutation that orders the scored personas as the data do ties with it: about
    # 1 / n_scored! of the draws, whatever their number
    if math.factorial(n_scored) * level <= 1:
        text += (f" With {n_scored} held-out personas no PC can pass: a pair's p cannot fall "
                 f"below about 1/{n_scored}! = {1 / math.factorial(n_scored):.2g}; at "
                 f"{n_layers} layer(s) at least {2 * _scored_needed(level) - 1} personas are needed.")
    return text + (" k_found is a lower bound on the shared dimension: each PC is scored on the "
                   "held-out personas alone, and a shared PC that the fit half estimates mixed "
                   "with the recipes' own dimensions can fail (planted 5 shared dimensions: "
                   f"{POWER_NOTE}).")


def _scored_needed(level: float) -> int:
    """The fewest held-out personas whose orderings can put a p below ``level``."""
    n = 1
    while math.factorial(n) * level <= 1:
        n += 1
    return n


def _layer_k(lay: SubspaceLayer) -> str:
    return f"L{lay.layer} {'≥' if lay.k_found_saturated else ''}{lay.k}"


def answer(result: SubspaceResult | Mapping[str, Any]) -> str:
    """One sentence (≤ 220 characters) on a subspace result (or subspace.json as a mapping): is
    there a shared subspace, of what dimension per layer, beyond chance; or, when none is, what
    a PC would have needed to pass and what the personas allow."""
    if not isinstance(result, SubspaceResult):
        from tlpersona.infra.resultjson import Reader

        result = Reader(None).dataclass(SubspaceResult, dict(result), "")
    layers = result.layers
    n_layers = len(layers)
    n = result.n_personas
    held = layers[0].held_out if layers else HeldOutSplit(n // 2, n - n // 2)
    who = f"{n} personas, {held.n_fit} fit"
    beyond = [lay for lay in layers if lay.k and lay.k_found_p_holm < ALPHA]
    if beyond:
        worst = max(lay.k_found_p_holm for lay in beyond)
        head = f"Shared subspace beyond chance at {len(beyond)}/{n_layers} layers"
        # the test calls the layer (PC1 shared by every pair); k itself is descriptive
        tail = f" (Holm p ≤ {worst:.2g}; {who}; the count is descriptive beyond 1)."
        full = f"{head}: {', '.join(_layer_k(lay) for lay in beyond)}{tail}"
        ks = [lay.k for lay in beyond if lay.k]
        short = (f"{head}, k = {min(ks)}–{max(ks)}"
                 f"{' (some ≥: saturated)' if any(lay.k_found_saturated for lay in beyond) else ''}"
                 f"{tail}")
        return _fit(full, short)
    # nothing found: how far PC1 was from passing, and what the personas allow at most
    best = None
    for lay in layers:
        if lay.per_pc and lay.per_pc_threshold:
            got = float(_pc1_statistic(lay.per_pc[0]))
            bar = lay.per_pc_threshold[0]
            if best is None or (bar is not None and got - bar > best[1] - best[2]):
                best = (lay.layer, got, bar if bar is not None else float("-inf"))
    cap = f"at most {held.n_fit - 1} PC(s) can be counted, each on {held.n_scored} held-out"
    if best is None or not np.isfinite(best[1]) or not np.isfinite(best[2]):
        return _fit(f"No shared subspace at {n_layers} layer(s): with {who}, {cap} personas; "
                    "more personas would be needed to see one.",
                    f"No shared subspace at {n_layers} layer(s) ({who}): more personas needed.")
    layer, got, bar = best
    return _fit(f"No shared subspace beyond chance at {n_layers} layer(s): PC1's agreement "
                f"reached r {got:.2f} at best (L{layer}) against {bar:.2f} needed; with {who}, "
                f"{cap} personas.",
                f"No shared subspace beyond chance at {n_layers} layer(s): PC1 reached r "
                f"{got:.2f} at best (L{layer}), {bar:.2f} needed ({who}).")


def _pc1_statistic(row: PCAgreement) -> float:
    """:func:`pc_statistic` of one typed row."""
    return float(pc_statistic([{"pairs": row.pairs}])[0])


def _fit(text: str, shorter: str, limit: int = 220) -> str:
    """``text`` if it fits in ``limit`` characters, else ``shorter`` (cut if it too does not)."""
    if len(text) <= limit:
        return text
    return shorter if len(shorter) <= limit else shorter[: limit - 1] + "…"


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


def held_out(raw: dict[str, np.ndarray], positions: list[str], pairs: list[tuple[str, str]],
             fit: np.ndarray, test: np.ndarray, k_max: int, unit_norm: bool, curve: bool = True
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, np.ndarray]]:
    """Shared PCs fitted on the ``fit`` personas only (their mean, scale and PCA), agreement
    scored on the ``test`` personas only. Returns the per-PC agreement, the K curve (empty
    without ``curve``: the relabelled draws need only the scores) and each recipe's held-out
    scores on the countable PCs ``[n_test, PC]`` (what the per-PC test permutes)."""
    centring = {p: Centring.fit(x[fit], unit_norm) for p, x in raw.items()}
    stacked = np.concatenate([centring[p].apply(raw[p][fit]) for p in positions])
    k = min(k_max, stacked.shape[0] - 1, stacked.shape[1])
    components = top_components(stacked, k)
    test_rows = {p: centring[p].apply(raw[p][test]) for p in positions}
    # a recipe's fit half spans n_fit - 1 directions: PCs past that are not its own estimate
    countable = components[: len(fit) - 1]
    scores = {p: x @ countable.T for p, x in test_rows.items()}
    return (agreement_from_scores(scores, pairs),
            agreement_curve(test_rows, components, pairs) if curve else [], scores)


def subspace(source: ActivationSource, cfg: SubspaceConfig | None = None) -> SubspaceResult:
    """Shared PCs per layer, agreement curves, k_found (held out) with its null, in-sample
    values, variance shares and the sink check, as a :class:`SubspaceResult` (its
    ``components[layer]``: the all-persona PCA's components ``[k, d]``)."""
    from tlpersona.analyses.compare import default_positions

    cfg = cfg or SubspaceConfig()
    positions = ([canonical(p) for p in cfg.positions] if cfg.positions
                 else default_positions(list(source.positions)))
    if len(positions) < 2:
        raise TlpersonaError("the subspace needs at least two positions")
    missing = [p for p in positions if p not in source.positions]
    if missing:
        raise TlpersonaError(f"position {missing[0]} is not in the input")
    from tlpersona.analyses.aligned import ALIGNMENTS, aligned_layer

    if cfg.align not in ALIGNMENTS:
        raise TlpersonaError(f"align must be one of {', '.join(ALIGNMENTS)}, not {cfg.align!r}")
    if cfg.k_max < 1:
        raise TlpersonaError(f"k_max must be at least 1, got {cfg.k_max}")
    n = len(source.personas)
    if n < 4:
        raise TlpersonaError(f"the subspace needs at least 4 personas, got {n}")
    layers = cfg.layers or list(source.layers)
    pairs = list(itertools.combinations(positions, 2))
    if cfg.permutations is not None and cfg.permutations < 1:
        raise TlpersonaError(f"`permutations` must be at least 1, got {cfg.permutations}")
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    fit_half, test_half = perm[: n // 2], perm[n // 2:]
    level = pc_level(len(layers))
    relabels = [rng.permutation(n) for _ in range(cfg.null_draws)]
    n_perm = perm_count(len(layers), cfg.permutations)
    # one set for every layer and pair: each pair's p is exact on its own, which the
    # intersection-union test and Holm over layers need (no independence across them)
    perms = label_permutations(len(test_half), n_perm, rng)
    comps: dict[int, np.ndarray] = {}
    scores_12: dict[int, dict[str, np.ndarray]] = {}
    found: list[SubspaceLayer] = []
    for layer in layers:
        li = source.layer_index(layer)
        raw = {p: source.centroids(p)[:, li].double().numpy() for p in positions}
        mats = {p: prepare(x, cfg.unit_norm) for p, x in raw.items()}
        stacked = np.concatenate([mats[p] for p in positions])
        k_max = min(cfg.k_max, stacked.shape[0] - 1, stacked.shape[1])
        pca = PCA(n_components=k_max, svd_solver="full").fit(stacked)
        comps[layer] = pca.components_
        scores_12[layer] = {p: mats[p] @ pca.components_[:2].T for p in positions}
        curve = agreement_curve(mats, pca.components_, pairs)
        in_pc = per_pc_agreement(mats, pca.components_[: n - 1], pairs)
        held_pc, held, scores = held_out(raw, positions, pairs, fit_half, test_half, k_max,
                                         cfg.unit_norm)
        count = count_shared(scores, pairs, perms, level)
        # Descriptive null: the last recipe's personas relabelled, everything refitted and
        # counted by the same test.
        null = []
        for relabel in relabels:
            shuffled = {**raw, positions[-1]: raw[positions[-1]][relabel]}
            draw = held_out(shuffled, positions, pairs, fit_half, test_half, k_max,
                            cfg.unit_norm, curve=False)[2]
            null.append(count_shared(draw, pairs, perms, level, full=False).k)
        variance = {}
        for p in positions:
            x = mats[p]
            total = float(np.sum(x * x))
            shared = np.cumsum(np.sum((x @ pca.components_.T) ** 2, axis=0)) / total
            own = PCA(n_components=min(k_max, n - 1), svd_solver="full").fit(x)  # exact, reproducible
            own_cum = np.cumsum(own.explained_variance_ratio_)
            angles = [float(np.degrees(subspace_angles(own.components_[:k].T,
                                                       pca.components_[:k].T)).max())
                      for k in range(1, min(k_max, own.components_.shape[0]) + 1)]
            variance[p] = RecipeVariance(shared.tolist(), own_cum.tolist(), angles)
        k_held = count.k
        found.append(SubspaceLayer(
            layer=layer,
            k_max=k_max,
            k=k_held,
            k_found_held_out=k_held,
            k_found_saturated=bool(k_held) and k_held == len(held_pc),
            k_found_in_sample=k_found(in_pc, cfg.min_r),
            k_found_p=count.p,
            k_found_null=null,
            k_found_null_p=null_p(k_held, null),
            per_pc_p_iut=count.per_pc_p,
            per_pc_pair_p=count.per_pc_pair_p,
            per_pc_threshold=count.per_pc_threshold,
            k_largest_passing=k_largest_passing(held, cfg.min_cos, cfg.min_r),
            k_largest_passing_in_sample=k_largest_passing(curve, cfg.min_cos, cfg.min_r),
            per_pc=pc_rows(held_pc),
            per_pc_in_sample=pc_rows(in_pc),
            held_out=HeldOutSplit(len(fit_half), len(test_half)),
            explained_variance_ratio=pca.explained_variance_ratio_.tolist(),
            pc1_sink_cos=_sink_cos(source, li, pca.components_[0]),
            curve=curve_rows(curve),
            held_out_curve=curve_rows(held),
            variance=variance,
            aligned_layer=(aligned_layer(raw, positions, pairs, fit_half, test_half, relabels,
                                         perms, cfg.unit_norm, cfg.min_r, level)
                           if cfg.align == "procrustes" else None),
            # Holm over every layer needs them all: set below, before the result is returned
            k_found_p_holm=math.nan,
            k_found_null_p_holm=None,
        ))
    found = _with_holm(found)
    return SubspaceResult(
        positions=positions, n_personas=n, unit_norm=cfg.unit_norm, align=cfg.align,
        thresholds=SubspaceThresholds(cfg.min_cos, cfg.min_r),
        null=NullDraws(cfg.null_draws, cfg.null_draws, positions[-1], level),
        n_permutations=n_perm, permutations_requested=cfg.permutations, seed=cfg.seed,
        inputs=ManifestRef(source.manifest_hash), layers=found, code_version=__version__,
        components=comps, scores=scores_12, personas=list(source.personas), source=source)


def _with_holm(layers: list[SubspaceLayer]) -> list[SubspaceLayer]:
    """The layers with their calls Holm-adjusted over every layer (:func:`layer_holm`), the
    aligned counts as one family of their own."""
    calls, nulls = layer_holm([la.k_found_p for la in layers], [la.k_found_null_p for la in layers],
                              [bool(la.k_found_null) for la in layers])
    out = [replace(la, k_found_p_holm=c, k_found_null_p_holm=q)
           for la, c, q in zip(layers, calls, nulls, strict=True)]
    aligned = [la.aligned_layer for la in out]
    if not all(a is not None for a in aligned):
        return out
    ready = [a for a in aligned if a is not None]
    calls, nulls = layer_holm([a.k_found_p for a in ready], [a.k_found_null_p for a in ready],
                              [bool(a.k_found_null) for a in ready])
    return [replace(la, aligned_layer=replace(a, k_found_p_holm=c, k_found_null_p_holm=q))
            for la, a, c, q in zip(out, ready, calls, nulls, strict=True)]


def pc_rows(rows: list[dict[str, Any]]) -> list[PCAgreement]:
    """Per-PC agreement rows (:func:`agreement_from_scores`) as typed rows."""
    return [PCAgreement(row["pc"], row["pairs"]) for row in rows]


def curve_rows(rows: list[dict[str, Any]]) -> list[CurveRow]:
    """K-curve rows (:func:`agreement_curve`) as typed rows."""
    return [CurveRow(row["k"], {name: CurvePair(v["cos_mean"], v["cos_min"], v["mc_r"])
                                for name, v in row["pairs"].items()}) for row in rows]


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


def _sink_cos(source: ActivationSource, li: int, pc1: np.ndarray) -> float | None:
    """|cos| between the first shared PC and the first token's residual (None without it)."""
    if "first" not in source.positions:
        return None
    sink = source.centroids("first")[:, li].double().numpy().mean(0)
    norm = np.linalg.norm(sink) * np.linalg.norm(pc1)
    return float(abs(sink @ pc1) / norm) if norm > 0 else None
