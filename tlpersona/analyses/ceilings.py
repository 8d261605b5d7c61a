"""Split-half ceilings: what two recipes (or one recipe in two models) could reach if they were
the same, given each one's sampling noise over questions; the sampling SD of the mean-centred
matrix r over question halves; and the CKA entry of a cell beside its ceilings. The ceiling
and CKA types they build (:class:`Ceiling`, :class:`CkaEntry`, :class:`CkaCell`) live here: the
comparison's cells import this module, so it takes nothing from the compare package.

Shared by the recipe comparison (:mod:`tlpersona.analyses.compare`) and the cross-model
comparison (:mod:`tlpersona.analyses.cross_model`). Everything here is a function of each
side's own persona × persona matrices or split-half agreements, so the two sides may have
different widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import overload

import numpy as np

from tlpersona.analyses import metrics as M
from tlpersona.analyses.controls import FloorReason, FloorStats
from tlpersona.infra.resultjson import OMIT_NONE


@dataclass(frozen=True)
class Ceiling:
    """What two recipes could reach if they were the same recipe: the geometric mean of their
    full-size split-half agreements (None where unknown)."""

    per_persona_cos_mean: float | None
    per_persona_cos_min: float | None
    matrix_mc_pearson: float | None
    procrustes_cos_mean: float | None


@dataclass(frozen=True)
class CkaEntry:
    """One CKA of a pair beside its permutation null, its ceiling (at ``ceiling_size``) and,
    where it is defined, its p Holm-adjusted over every cell."""

    value: float | None
    null_mean: float | None
    null_sd: float | None
    null_p95: float | None
    p: float | None
    ceiling: float | None
    ceiling_size: str
    p_holm: float | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True)
class CkaCell:
    """Linear and debiased CKA of a pair's mean-centred centroids, for comparability with
    other tools: not part of the verdict."""

    for_comparability: bool
    centred: str
    n_perm: int
    linear: CkaEntry
    debiased: CkaEntry


@dataclass(frozen=True)
class Halves:
    """One recipe at one layer, per half of every question split (the split-half ceiling's
    halves; every recipe of a run gets the same splits): the raw half centroids at unit length
    ``[persona, 2K, d]`` and the standardised upper triangles of their mean-centred cosine
    matrices ``[2K, pairs]`` (a dot product of two is their Pearson r). A question-invariant
    recipe has one "half", its centroid, which broadcasts against any other recipe's."""

    unit: np.ndarray
    mc_tri: np.ndarray

    @classmethod
    def of(cls, halves: np.ndarray, iu: tuple[np.ndarray, np.ndarray]) -> Halves:
        """From half centroids ``[persona, H, d]``; ``iu``: the upper triangle's indices."""
        tri = np.stack([M.cos_matrix(M.mean_centre(halves[:, h]))[iu]
                        for h in range(halves.shape[1])])
        tri -= tri.mean(1, keepdims=True)
        tri /= np.maximum(np.linalg.norm(tri, axis=1, keepdims=True), 1e-300)
        # float16: these only feed a spread; at full scale they are 20 halves of 275 × 3584
        unit = halves / np.maximum(np.linalg.norm(halves, axis=2, keepdims=True), 1e-300)
        return cls(unit.astype(np.float16), tri.astype(np.float32))


@overload
def mc_r_sd(hx: Halves, hy: Halves) -> float: ...
@overload
def mc_r_sd(hx: Halves | None, hy: Halves | None) -> float | None: ...
def mc_r_sd(hx: Halves | None, hy: Halves | None) -> float | None:
    """Sampling standard deviation, over questions, of the mean-centred matrix r between two
    sides (two recipes, or one recipe in two models): the delete-half jackknife (Shao & Wu
    1989). The r is recomputed on every half of the questions, both sides on the same half;
    with half of n questions deleted, the spread of those values around their mean estimates
    the variance of the full-size statistic (factor (n − d) / d = 1). In the statistic's own
    units (r here, the min cos in :func:`tlpersona.analyses.compare.cells.half_sd`): on planted
    identical recipes (5–26 personas, 12 questions) it matched or exceeded the spread of
    observed minus ceiling, where in Fisher z units (derivative taken at the lower half-size
    value) it fell short by 10–30 %. Only the matrices' triangles ``[H, pairs]`` enter, so the
    two sides' widths need not match. Zero where both sides are question-invariant; None where
    either has no halves (no per-question vectors)."""
    if hx is None or hy is None:
        return None
    rs = np.einsum("hm,hm->h", hx.mc_tri, hy.mc_tri).astype(np.float64)
    return float(rs.std())


def ceiling(fx: FloorStats | FloorReason | None, fy: FloorStats | FloorReason | None
            ) -> Ceiling:
    """What two sides could reach if they were the same recipe, from each one's split-half
    floor (``fx``, ``fy``: :func:`tlpersona.analyses.controls.floor_stats`, or why there is
    none; None: not computed): the geometric mean of their split-half agreements (attenuation:
    noise in either lowers agreement multiplicatively; question-invariant recipes have no
    sampling noise and count 1; None where unknown). Every value is Spearman–Brown corrected
    to full-size centroids, the size the statistic itself is computed at: half-size values sit
    well below what identical recipes reach (0.20 against 0.44 for the Procrustes cosine of a
    noisy planted pair), so a cell could look at its ceiling while far from it."""

    def one(v: FloorStats | FloorReason | None, key: str) -> float | None:
        if isinstance(v, FloorReason):
            return 1.0 if v.exact is True else None
        got: float | None = None if v is None else getattr(v, key)
        return got

    def joint(key: str) -> float | None:
        got = [one(v, key) for v in (fx, fy)]
        if got[0] is None or got[1] is None:
            return None
        return float(np.sqrt(max(got[0], 0.0) * max(got[1], 0.0)))

    return Ceiling(joint("per_persona_cos_mean_full"), joint("per_persona_cos_min_full"),
                   joint("matrix_mc_pearson_full"), joint("procrustes_cos_mean_full"))


@dataclass(frozen=True)
class CkaReliability:
    """How far one recipe's sampling noise lets its CKA with an identical recipe reach: the
    half-size split-half linear CKA, and the full-size debiased one (1 for question-invariant
    recipes; None where unknown)."""

    linear_half: float | None
    debiased_full: float | None


def cka_reliability(half: M.SplitHalfCka | None, gram: np.ndarray,
                    invariant: bool) -> CkaReliability:
    """One recipe's :class:`CkaReliability` from its split-half CKA (``half``; None: no
    per-question vectors) and the centred Gram matrix of its full centroids ``gram``
    ``[persona, persona]`` (:func:`tlpersona.analyses.metrics.centred_gram`); ``invariant``:
    the recipe is question-invariant.

    The debiased value is full size: the unbiased HSIC between independent question halves
    estimates the noise-free ‖C‖², and the full centroids' own unbiased HSIC is
    ‖C + C_noise‖², so their ratio is the attenuation factor identical recipes' debiased CKA
    gets at full size. The biased (linear) HSIC has noise terms in the cross product too, so
    no such correction exists for linear CKA, and neither is Spearman–Brown valid; its value
    stays at half size, below what identical recipes reach at full size."""
    if invariant:
        return CkaReliability(1.0, 1.0)
    if half is None:
        return CkaReliability(None, None)
    own = M.hsic_unbiased(gram, gram)
    return CkaReliability(half.linear, half.hsic_cross / own if own > 0 else None)


def cka_cell(score: M.CkaScore, rx: CkaReliability, ry: CkaReliability,
             n_perm: int) -> CkaCell:
    """A cell's CKA entry from its scores against the permutation null (``n_perm`` draws) and
    the two sides' reliabilities, the ceilings their geometric mean; for comparability with
    other tools, not part of a verdict or call (its p-values before Holm over the cells)."""

    def joint(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else float(np.sqrt(max(a, 0.0) * max(b, 0.0)))

    def entry(s: M.CkaStat, ceil: float | None, size: str) -> CkaEntry:
        return CkaEntry(s.value, s.null_mean, s.null_sd, s.null_p95, s.p, ceil, size)

    return CkaCell(True, "mean over personas", n_perm,
                   entry(score.linear, joint(rx.linear_half, ry.linear_half), "half"),
                   entry(score.debiased, joint(rx.debiased_full, ry.debiased_full), "full"))
