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
``tests/unit/test_subspace_iut.py``). When all countable PCs pass, ``k_found_saturated`` says the
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
from dataclasses import InitVar, dataclass, replace
from typing import Any

import numpy as np
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from tlpersona.analyses.aligned import ALIGNMENTS, aligned_layer
from tlpersona.analyses.kfound import (
    Centring,
    agreement_curve,
    agreement_from_scores,
    count_shared,
    k_found,
    k_largest_passing,
    label_permutations,
    layer_holm,
    null_p,
    pc_level,
    per_pc_agreement,
    perm_count,
    prepare,
    top_components,
)
from tlpersona.analyses.subspace_result import (
    CurvePair,
    CurveRow,
    HeldOutSplit,
    ManifestRef,
    NullDraws,
    RecipeVariance,
    SubspaceLayer,
    SubspaceResult,
    SubspaceThresholds,
    pc_rows,
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


def curve_rows(rows: list[dict[str, Any]]) -> list[CurveRow]:
    """K-curve rows (:func:`agreement_curve`) as typed rows."""
    return [CurveRow(row["k"], {name: CurvePair(v["cos_mean"], v["cos_min"], v["mc_r"])
                                for name, v in row["pairs"].items()}) for row in rows]


def _sink_cos(source: ActivationSource, li: int, pc1: np.ndarray) -> float | None:
    """|cos| between the first shared PC and the first token's residual (None without it)."""
    if "first" not in source.positions:
        return None
    sink = source.centroids("first")[:, li].double().numpy().mean(0)
    norm = np.linalg.norm(sink) * np.linalg.norm(pc1)
    return float(abs(sink @ pc1) / norm) if norm > 0 else None
