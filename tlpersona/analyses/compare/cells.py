"""One layer's cells: every pair of recipes at one layer, each statistic beside its null and
ceiling, before and after Holm over the run.

The per-question pass (:func:`per_question_pass`) reads each recipe's per-question vectors once
for every layer: spreads, split-half noise floors and their halves. :func:`layer_cells` then
gives one layer's cells (:func:`pair_cell`: per-persona cosines, the Mantel, Procrustes and CKA
tests, spread, ceiling and "(noise)" check), and :func:`paired_tests` its paired sign-flip
tests; :func:`adjusted` applies Holm over every cell of the run and the verdicts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import stats

from tlpersona.analyses import metrics as M
from tlpersona.analyses.ceilings import (
    Ceiling,
    CkaCell,
    CkaReliability,
    Halves,
    ceiling,
    cka_cell,
    cka_reliability,
    mc_r_sd,
)
from tlpersona.analyses.compare.result import (
    CentredCosStats,
    CosStats,
    MatrixStats,
    NoiseCheck,
    PairCell,
    PairedTest,
    Spread,
    SpreadSkipped,
    Thresholds,
)
from tlpersona.analyses.compare.verdicts import failed_bounds, noise_check, pair_tag, verdict, within_noise
from tlpersona.analyses.controls import (
    CHUNK,
    FloorReason,
    FloorStats,
    floor_stats,
    half_centroids,
    split_masks,
)
from tlpersona.analyses.metrics import HeldOutCos, HeldOutSkipped
from tlpersona.analyses.stats import MantelPermuter, MantelResult, holm, sign_flip_p, sign_flip_z, z_score
from tlpersona.cache.source import ActivationSource

if TYPE_CHECKING:  # the package's driver imports this module
    from tlpersona.analyses.compare import CompareConfig, StageClock


def half_sd(hx: Halves, hy: Halves) -> dict[str, float]:
    """Sampling standard deviation, over questions, of a pair's per-persona min cos and
    mean-centred r: the delete-half jackknife of :func:`tlpersona.analyses.ceilings.mc_r_sd`
    (which gives the r's, and says why), the min cos recomputed the same way on every half of
    the questions, both recipes on the same half. Unlike the r, the per-persona cosine compares
    the two recipes' vectors coordinate by coordinate, so both must have one width. Zero where
    both recipes are question-invariant."""
    per_persona = np.einsum("phd,phd->ph", hx.unit.astype(np.float32), hy.unit.astype(np.float32))
    mins = per_persona.min(0).astype(np.float64)
    return {"min_cos": float(mins.std()), "mc_r": mc_r_sd(hx, hy)}


@dataclass
class PerQuestion:
    """What the per-question pass gives every compared recipe: per recipe and layer, the spread
    per question ``[question]`` and the noise floor (or why it has none); per (recipe, layer),
    the floor's halves (absent: noise unknown) and the split-half CKA."""

    spreads: dict[str, dict[int, np.ndarray]]
    floors: dict[str, dict[int, FloorStats | FloorReason]]
    halves: dict[tuple[str, int], Halves]
    cka: dict[tuple[str, int], M.SplitHalfCka]


def per_question_pass(source: ActivationSource, positions: list[str], layers: list[int],
                      n_splits: int, seed: int, iu: tuple[np.ndarray, np.ndarray],
                      clock: StageClock) -> PerQuestion:
    """:func:`question_pass` over every recipe of ``positions`` that has per-question vectors,
    in ``positions`` order; a question-invariant recipe, or one without per-question vectors,
    gets only the reason it has no noise floor."""
    out = PerQuestion({}, {}, {}, {})
    for p in positions:
        clock.start()
        if source.question_invariant(p) or not source.has_per_question(p):
            reason = (FloorReason(True, "question-invariant: no sampling noise")
                      if source.question_invariant(p) else
                      FloorReason(None, "no per-question vectors in the input"))
            out.floors[p] = {layer: reason for layer in layers}
            continue
        qp = question_pass(source, p, layers, n_splits, seed, iu)
        out.spreads[p], out.floors[p] = qp.spreads, qp.floors
        out.halves.update({(p, layer): h for layer, h in qp.halves.items()})
        out.cka.update({(p, layer): h for layer, h in qp.cka.items()})
        clock.tick("spread and noise floor")
    return out


@dataclass(frozen=True)
class LayerCentroids:
    """One layer's persona centroids per recipe ``[persona, d]`` (float64), mean-centred, and
    their (raw, mean-centred) cosine matrices ``[persona, persona]``."""

    cent: dict[str, np.ndarray]
    mc: dict[str, np.ndarray]
    mats: dict[str, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def of(cls, source: ActivationSource, layer: int, positions: list[str]) -> LayerCentroids:
        li = source.layer_index(layer)
        cent = {p: source.centroids(p)[:, li].double().numpy() for p in positions}
        mc = {p: M.mean_centre(c) for p, c in cent.items()}
        mats = {p: (M.cos_matrix(cent[p]), M.cos_matrix(mc[p])) for p in positions}
        return cls(cent, mc, mats)


@dataclass(frozen=True)
class LayerTests:
    """One layer's permutation-tested statistics: Mantel per (x, y, 0 raw | 1 mean-centred)
    (None: a constant geometry), held-out Procrustes and CKA per pair, CKA reliability per
    recipe."""

    mantel: dict[tuple[str, str, int], MantelResult | None]
    procrustes: dict[tuple[str, str], M.ProcrustesScore]
    cka: dict[tuple[str, str], M.CkaScore]
    reliability: dict[str, CkaReliability]


@dataclass(frozen=True)
class LayerCells:
    """What :func:`layer_cells` gives for one layer: its cells in pair order, the mean-centred
    cosine matrices per recipe ``[persona, persona]`` (for the report's figure), and the
    per-persona cosines per pair ``[persona]`` (for :func:`paired_tests`)."""

    cells: list[UnadjustedCell]
    cos_matrices: dict[str, np.ndarray]
    per_persona_cos: dict[tuple[str, str], np.ndarray]


def layer_cells(source: ActivationSource, layer: int, positions: list[str],
                permuter: MantelPermuter, per_q: PerQuestion, cfg: CompareConfig,
                clock: StageClock) -> LayerCells:
    """Every pair of ``positions`` (``itertools.combinations`` order) at ``layer``, before Holm.
    The held-out Procrustes null draws from ``cfg.seed + layer``; the Mantel and CKA nulls use
    ``permuter``'s draws, the same at every layer."""
    pairs = list(itertools.combinations(positions, 2))
    lc = LayerCentroids.of(source, layer, positions)
    halves = {p: per_q.halves.get((p, layer)) for p in positions}
    for p in positions:
        if source.question_invariant(p):  # no noise: every half is the centroid
            halves[p] = Halves.of(lc.cent[p][:, None], permuter.iu)
    clock.tick("centroid metrics")
    mantel = mantel_tests(permuter, pairs, positions, lc.mats)
    clock.tick("mantel permutations")
    held = M.HeldOutProcrustes(len(source.personas), M.PROCRUSTES_SPLITS,
                               np.random.default_rng(cfg.seed + layer), cfg.null_draws)
    for p in positions:
        held.add(p, lc.cent[p])
    proc = held.score_pairs(pairs)
    clock.tick("held-out Procrustes and its null")
    grams = {p: M.centred_gram(lc.cent[p]) for p in positions}
    cka = cka_tests(permuter, pairs, positions, grams)
    reliability = {p: cka_reliability(per_q.cka.get((p, layer)), grams[p],
                                      source.question_invariant(p)) for p in positions}
    tests = LayerTests(mantel, proc, cka, reliability)
    clock.tick("CKA and its null")
    spreads = {p: per_q.spreads[p].get(layer) if p in per_q.spreads else None
               for p in positions}
    cells, pp_cos = [], {}
    for x, y in pairs:
        cell = pair_cell(source, layer, (x, y), lc, tests, spreads, halves,
                         per_q.floors, permuter, cfg)
        cells.append(cell)
        pp_cos[(x, y)] = cell.cos
    clock.tick("pair metrics")
    return LayerCells(cells, {p: lc.mats[p][1] for p in positions}, pp_cos)


def mantel_tests(permuter: MantelPermuter, pairs: list[tuple[str, str]], positions: list[str],
                 mats: dict[str, tuple[np.ndarray, np.ndarray]]
                 ) -> dict[tuple[str, str, int], MantelResult | None]:
    """The raw (kind 0) and mean-centred (kind 1) Mantel test of every pair (x, y). Grouped by
    the permuted matrix: one recipe's permutations in memory at a time, and one matrix product
    per recipe for all its partners."""
    mantel: dict[tuple[str, str, int], MantelResult | None] = {}
    for y in positions:
        xs = [x for x, yy in pairs if yy == y]
        for kind in (0, 1):  # raw, mean-centred
            if xs:
                res = permuter.tests([mats[x][kind] for x in xs], mats[y][kind])
                mantel.update({(x, y, kind): r for x, r in zip(xs, res, strict=True)})
    return mantel


def cka_tests(permuter: MantelPermuter, pairs: list[tuple[str, str]], positions: list[str],
              grams: dict[str, np.ndarray]) -> dict[tuple[str, str], M.CkaScore]:
    """Linear and debiased CKA of every pair (x, y) from the recipes' centred Gram matrices
    ``[persona, persona]``, against one gathered null per y for all its partners (the Mantel
    draws)."""
    cka: dict[tuple[str, str], M.CkaScore] = {}
    for y in positions:
        xs = [x for x, yy in pairs if yy == y]
        if xs:
            scores = M.cka_scores([grams[x] for x in xs], grams[y], permuter.perms,
                                  permuter.flat)
            cka.update({(x, y): s for x, s in zip(xs, scores, strict=True)})
    return cka


def pair_cell(source: ActivationSource, layer: int, pair: tuple[str, str], lc: LayerCentroids,
              tests: LayerTests, spreads: dict[str, np.ndarray | None],
              halves: dict[str, Halves | None],
              floors: dict[str, dict[int, FloorStats | FloorReason]],
              permuter: MantelPermuter, cfg: CompareConfig) -> UnadjustedCell:
    """One cell: the pair's per-persona cosines and their shuffled-label baselines, its
    matrix tests, spread, ceiling and "(noise)" check, before Holm."""
    x, y = pair
    th = cfg.thresholds
    cent, mc, mats = lc.cent, lc.mc, lc.mats
    cos = M.rowwise_cos(cent[x], cent[y])
    mc_cos = M.rowwise_cos(mc[x], mc[y])
    raw_t = (M.upper(mats[x][0]), M.upper(mats[y][0]))
    mc_t = (M.upper(mats[x][1]), M.upper(mats[y][1]))
    spread, rho = spread_of(source, pair, spreads[x], spreads[y], th)
    s = M.Summary.of(cos)
    pair_ceiling = ceiling(floors[x].get(layer), floors[y].get(layer))
    # geo: the mean-centred test
    raw_test, geo = tests.mantel[(x, y, 0)], tests.mantel[(x, y, 1)]
    hx, hy = halves[x], halves[y]
    noise = noise_check(s.min, None if geo is None else geo.r, rho, pair_ceiling,
                        None if hx is None or hy is None else half_sd(hx, hy), th,
                        None if geo is None else geo.p, cfg.alpha)
    mcs = M.Summary.of(mc_cos)
    return UnadjustedCell(
        layer=layer, pair=(x, y),
        per_persona_cos=CosStats(s.mean, s.min, s.p5, s.max,
                                 _shuffled_cos_mean(cent[x], cent[y]),
                                 *_shuffled_cos_low(cent[x], cent[y], permuter.perms)),
        per_persona_cos_mc=CentredCosStats(mcs.mean, mcs.min, mcs.p5, mcs.max,
                                           _shuffled_cos_mean(mc[x], mc[y])),
        procrustes=tests.procrustes[(x, y)].held_out(pair_ceiling.procrustes_cos_mean),
        matrix_raw=(raw_test, _spearman(raw_test, raw_t)),
        matrix_mc=(geo, _spearman(geo, mc_t)),
        spread=spread, ceiling=pair_ceiling, rho=rho, noise=noise,
        per_persona_cos_all=[round(float(v), 6) for v in cos],
        cka=cka_cell(tests.cka[(x, y)], tests.reliability[x], tests.reliability[y],
                     permuter.n_perm),
        cos=cos)


def spread_of(source: ActivationSource, pair: tuple[str, str], sx: np.ndarray | None,
              sy: np.ndarray | None, th: Thresholds) -> tuple[Spread | SpreadSkipped, float | None]:
    """The Spearman ρ between two recipes' spreads per question ``[question]`` (questions
    where either is NaN left out), or why there is none; and ρ itself (None where skipped)."""
    if sx is None or sy is None:
        x, y = pair
        why = ("question-invariant recipe: no per-question variation"
               if source.question_invariant(x) or source.question_invariant(y)
               else "no per-question vectors in the input")
        return SpreadSkipped(reason=why), None
    ok = ~(np.isnan(sx) | np.isnan(sy))
    sp = stats.spearmanr(sx[ok], sy[ok])
    rho = float(sp[0])
    return Spread(rho, float(sp[1]), int(ok.sum()), th.gate_spread), rho


#: One paired test before Holm: (layer, pair 1, pair 2, mean difference, sign-flip p, z).
PairedRow = tuple[int, tuple[str, str], tuple[str, str], float, float, float]


def paired_tests(layer: int, per_persona_cos: dict[tuple[str, str], np.ndarray]
                 ) -> list[PairedRow]:
    """For two pairs sharing a recipe, is one more aligned than the other? The sign-flip test
    of their per-persona cosine differences ``[persona]``, for every such two of
    ``per_persona_cos``'s pairs (in ``itertools.combinations`` order), before Holm."""
    pairs = list(per_persona_cos)
    tests = [(a, b) for a, b in itertools.combinations(pairs, 2) if set(a) & set(b)]
    if not tests:
        return []
    d = np.stack([per_persona_cos[a] - per_persona_cos[b] for a, b in tests])
    pvals = sign_flip_p(d)
    zs = sign_flip_z(d)
    return [(layer, a, b, float(dv.mean()), float(pv), float(z))
            for (a, b), dv, pv, z in zip(tests, d, pvals, zs, strict=True)]


def paired_holm(rows: list[PairedRow]) -> list[PairedTest]:
    """The paired tests of every layer with Holm over all of them (one family)."""
    adjusted = [float(a) for a in holm([t[4] for t in rows])]
    return [PairedTest(layer, a, b, diff, p, z, q)
            for (layer, a, b, diff, p, z), q in zip(rows, adjusted, strict=True)]


@dataclass(frozen=True)
class UnadjustedCell:
    """One cell's statistics before Holm over every cell of the run adjusts its p-values
    (:func:`adjusted` makes the :class:`PairCell`)."""

    layer: int
    pair: tuple[str, str]
    per_persona_cos: CosStats
    per_persona_cos_mc: CentredCosStats
    procrustes: HeldOutCos | HeldOutSkipped
    # the test and the triangles' Spearman r; None: a constant geometry, where both are undefined
    matrix_raw: tuple[MantelResult | None, float | None]
    matrix_mc: tuple[MantelResult | None, float | None]
    spread: Spread | SpreadSkipped
    ceiling: Ceiling
    rho: float | None  # the spread's Spearman ρ
    noise: NoiseCheck | None
    per_persona_cos_all: list[float]
    cka: CkaCell
    cos: np.ndarray  # per-persona cosines [persona], unrounded: the paired tests' input


def _holm_of(ps: list[float | None]) -> list[float | None]:
    """Holm over the p-values of ``ps`` (one family); None where a p is None."""
    adj = holm([np.nan if p is None else p for p in ps])
    return [None if p is None else float(a) for p, a in zip(ps, adj, strict=True)]


def adjusted(cells: list[UnadjustedCell], th: Thresholds, alpha: float,
              procrustes_corrected: bool) -> list[PairCell]:
    """The cells with their p-values Holm-adjusted, one family per kind of test across every
    cell of the run; the held-out Procrustes p only where its draws can reach ``alpha``."""
    raw = _holm_of([None if c.matrix_raw[0] is None else c.matrix_raw[0].p for c in cells])
    geo = _holm_of([None if c.matrix_mc[0] is None else c.matrix_mc[0].p for c in cells])
    proc = (_holm_of([c.procrustes.p if isinstance(c.procrustes, HeldOutCos) else None
                      for c in cells]) if procrustes_corrected else [None] * len(cells))
    lin = _holm_of([c.cka.linear.p for c in cells])
    deb = _holm_of([c.cka.debiased.p for c in cells])
    out = []
    for c, raw_h, geo_h, proc_h, lin_h, deb_h in zip(cells, raw, geo, proc, lin, deb,
                                                      strict=True):
        (x, y), s, g = c.pair, c.per_persona_cos, c.matrix_mc[0]
        r, p = (None, None) if g is None else (g.r, g.p)
        out.append(PairCell(
            layer=c.layer, pair=c.pair, tag=pair_tag(x, y),
            per_persona_cos=s, per_persona_cos_mc=c.per_persona_cos_mc,
            procrustes=(replace(c.procrustes, p_holm=proc_h)
                        if isinstance(c.procrustes, HeldOutCos) else c.procrustes),
            matrix_raw=_matrix(c.matrix_raw[0], c.matrix_raw[1], raw_h),
            matrix_mc=_matrix(c.matrix_mc[0], c.matrix_mc[1], geo_h),
            mantel_p=p, spread=c.spread, ceiling=c.ceiling,
            verdict=verdict(s.min, r, c.rho, th, p, alpha),
            failed_bounds=failed_bounds(s.min, r, c.rho, th, p, alpha),
            within_noise=within_noise(s.min, r, c.rho, c.ceiling, th, p, alpha),
            noise_mark=None if c.noise is None else c.noise.mark, noise_test=c.noise,
            per_persona_cos_all=c.per_persona_cos_all,
            cka=replace(c.cka, linear=replace(c.cka.linear, p_holm=lin_h),
                        debiased=replace(c.cka.debiased, p_holm=deb_h))))
    return out


@dataclass
class QuestionPass:
    """What one pass over a recipe's per-question vectors gives, per layer."""

    spreads: dict[int, np.ndarray]  # spread per question
    floors: dict[int, FloorStats | FloorReason]  # split-half noise floor (controls.floor_stats)
    halves: dict[int, Halves]  # the floor's halves, for the sampling error of pair statistics
    cka: dict[int, M.SplitHalfCka]  # split-half CKA, for the CKA ceilings


def question_pass(source: ActivationSource, pos: str, layers: list[int], n_splits: int,
                  seed: int, iu: tuple[np.ndarray, np.ndarray]) -> QuestionPass:
    """Spread per question, the noise floor and its halves for every layer, in one pass over a
    recipe's per-question vectors, ``CHUNK`` personas at a time (full scale is ~2 GB per
    recipe). The question splits depend on ``seed`` only, so every recipe gets the same."""
    valid = source.valid(pos)
    n_p, n_q = valid.shape
    lis = [source.layer_index(layer) for layer in layers]
    masks = split_masks(n_q, n_splits, seed) if n_q >= 2 else None
    sums = [torch.zeros((n_q, 1), dtype=torch.float64) for _ in layers]
    parts: list[list[torch.Tensor]] = [[] for _ in layers]
    for start in range(0, n_p, CHUNK):
        block = source.per_question_rows(pos, start, min(start + CHUNK, n_p))  # [c, q, L, d]
        ok = valid[start:start + block.shape[0]]
        for j, li in enumerate(lis):
            v = block[:, :, li].float()
            sums[j] = sums[j] + M.spread_sums(v, ok)
            if masks is not None:
                parts[j].append(half_centroids(v, ok, masks))
    out = QuestionPass({}, {}, {}, {})
    for j, layer in enumerate(layers):
        out.spreads[layer] = M.spread_finish(sums[j], valid.sum(0))
        if masks is None:
            out.floors[layer] = FloorReason(None, "fewer than 2 questions")
            continue
        h = torch.cat(parts[j]).double().numpy()
        out.floors[layer] = floor_stats(h, iu, seed + layer)
        out.halves[layer] = Halves.of(h, iu)
        out.cka[layer] = M.split_half_cka(h)
    return out


def _shuffled_cos_mean(x: np.ndarray, y: np.ndarray) -> float:
    """Expected mean per-persona cosine when one recipe's persona labels are shuffled uniformly
    at random: the mean of every (i, j) cosine (exact, no sampling)."""
    return float(np.mean(M.unit(x) @ M.unit(y).T))


def _shuffled_cos_low(x: np.ndarray, y: np.ndarray, perms: np.ndarray
                      ) -> tuple[float, float, float, float]:
    """The minimum and 5th percentile of the per-persona cosines with one recipe's persona labels
    shuffled by each of ``perms`` ``[N, n]`` (the Mantel test's permutations): their means and
    95th percentiles. A shared offset keeps raw cosines near 1 for any pairing; this says how
    high the low end is then. Returns (minimum's mean, its p95, 5th percentile's mean, its
    p95)."""
    c = M.unit(x) @ M.unit(y).T
    shuffled = c[np.arange(len(x))[None, :], perms]  # [N, n]
    mins, p5s = shuffled.min(1), np.percentile(shuffled, 5, axis=1)
    return (float(mins.mean()), float(np.percentile(mins, 95)), float(p5s.mean()),
            float(np.percentile(p5s, 95)))


def _spearman(test: MantelResult | None, tris: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Spearman r of two upper triangles ``[pairs]``; None where their Mantel ``test`` is
    undefined (a constant triangle, on which scipy warns and returns NaN)."""
    return None if test is None else float(stats.spearmanr(*tris)[0])


def _matrix(res: MantelResult | None, spearman: float | None,
            p_holm: float | None) -> MatrixStats:
    if res is None:
        return MatrixStats(None, None, None, None, None, None, None, None)
    return MatrixStats(res.r, spearman, res.p, res.null_mean, res.null_sd, res.null_p95,
                       z_score(res.r, res.null_mean, res.null_sd), p_holm)
