"""The split-half ceilings and their sampling SD (tlpersona.analyses.ceilings), and the Mantel
test's guard for a constant geometry, as both comparisons use them."""

import math

import numpy as np
import pytest

from tlpersona.analyses import metrics as M
from tlpersona.analyses.ceilings import (
    CkaReliability,
    Halves,
    ceiling,
    cka_cell,
    cka_reliability,
    mc_r_sd,
)
from tlpersona.analyses.compare.cells import half_sd
from tlpersona.analyses.controls import FloorReason, FloorStats, spearman_brown
from tlpersona.analyses.stats import MantelPermuter, varies


def _floor(cos_min: float, r: float, proc: float | None) -> FloorStats:
    """A split-half floor with these half-size values (the others 0)."""
    return FloorStats(
        exact=False, n_splits=4, half_size=True, per_persona_cos_mean=0.0,
        per_persona_cos_min=cos_min, per_persona_cos_min_split_mean=cos_min,
        matrix_mc_pearson_mean=r, matrix_mc_pearson_min=r,
        matrix_mc_pearson_full=spearman_brown(r), per_persona_cos_mean_full=0.0,
        per_persona_cos_min_full=spearman_brown(cos_min), procrustes_cos_mean=proc,
        procrustes_cos_mean_full=None if proc is None else spearman_brown(proc))


def test_a_ceiling_is_the_geometric_mean_of_the_full_size_floors():
    """Question-invariant sides count 1, unknown ones make the ceiling unknown, and a negative
    split-half value counts 0 (no agreement to expect)."""
    fx, fy = _floor(0.8, 0.6, 0.5), _floor(0.9, -0.2, None)
    got = ceiling(fx, fy)
    assert got.per_persona_cos_min == pytest.approx(
        math.sqrt(spearman_brown(0.8) * spearman_brown(0.9)))
    assert got.matrix_mc_pearson == 0.0
    assert got.procrustes_cos_mean is None
    exact = FloorReason(True, "question-invariant")
    assert ceiling(fx, exact).matrix_mc_pearson == pytest.approx(
        math.sqrt(spearman_brown(0.6)))
    assert ceiling(exact, exact).per_persona_cos_min == 1.0
    for unknown in (FloorReason(None, "no per-question vectors"), None):
        assert ceiling(fx, unknown).matrix_mc_pearson is None


def _halves(rng: np.random.Generator, base: np.ndarray, d: int, n_q: int) -> np.ndarray:
    """Half centroids ``[persona, 2K, d]`` of one geometry ``base`` in a random d-wide basis."""
    emb = np.linalg.qr(rng.normal(size=(d, base.shape[1])))[0].T
    return (base @ emb)[:, None] + rng.normal(size=(base.shape[0], n_q, d))


def test_the_matrix_r_sd_is_the_spread_over_halves_at_any_widths():
    """Two sides of different widths (the cross-model case): the SD is the population SD of
    the halves' mean-centred matrix r, checked against a direct computation; the recipe
    comparison's half_sd gives the same value for its r."""
    rng = np.random.default_rng(5)
    n, n_h = 9, 6
    base = rng.normal(size=(n, 4))
    hx, hy = _halves(rng, base, 20, n_h), _halves(rng, base, 33, n_h)
    iu = np.triu_indices(n, 1)
    rs = [np.corrcoef(M.cos_matrix(M.mean_centre(hx[:, h]))[iu],
                      M.cos_matrix(M.mean_centre(hy[:, h]))[iu])[0, 1] for h in range(n_h)]
    got = mc_r_sd(Halves.of(hx, iu), Halves.of(hy, iu))
    assert got == pytest.approx(np.std(rs), abs=1e-5) and got > 0
    same_width = _halves(rng, base, 20, n_h)
    assert (half_sd(Halves.of(hx, iu), Halves.of(same_width, iu))["mc_r"]
            == mc_r_sd(Halves.of(hx, iu), Halves.of(same_width, iu)))
    invariant = Halves.of(base[:, None], iu)
    assert mc_r_sd(invariant, Halves.of(base[:, None] @ np.eye(4, 7), iu)) == 0.0
    assert mc_r_sd(None, invariant) is None and mc_r_sd(invariant, None) is None


def test_cka_ceilings_combine_the_two_reliabilities():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 5))
    gram = M.centred_gram(x)
    assert cka_reliability(None, gram, invariant=True) == CkaReliability(1.0, 1.0)
    noisy = cka_reliability(M.split_half_cka(x[:, None] + rng.normal(size=(8, 4, 5))), gram,
                            invariant=False)
    assert noisy.linear_half is not None and noisy.debiased_full is not None
    assert cka_reliability(None, gram, invariant=False).debiased_full is None
    perm = MantelPermuter(8, 49, 0)
    (score,) = M.cka_scores([gram], M.centred_gram(x + 0.1 * rng.normal(size=x.shape)),
                            perm.perms, perm.flat)
    cell = cka_cell(score, noisy, cka_reliability(None, gram, invariant=True), perm.n_perm)
    assert cell.linear.ceiling == pytest.approx(math.sqrt(max(noisy.linear_half, 0.0)))
    assert cell.debiased.ceiling == pytest.approx(math.sqrt(max(noisy.debiased_full, 0.0)))
    assert cell.linear.value == score.linear.value and cell.n_perm == 49


def test_a_constant_triangle_has_no_mantel_test():
    """Equal entries are constant even where rounding leaves their standard deviation above
    zero; a pair with a constant matrix gets None, every other pair the plain test."""
    assert np.std(np.full(28, 0.1)) > 0 and not varies(np.full(28, 0.1))
    assert varies(np.r_[np.full(27, 0.1), 0.1 + 1e-15])
    rng = np.random.default_rng(1)
    n = 8
    pts = rng.normal(size=(n, 5))
    x, y = M.cos_matrix(pts), M.cos_matrix(pts + 0.1 * rng.normal(size=(n, 5)))
    flat = M.cos_matrix(np.repeat(rng.normal(size=(1, 5)), n, axis=0))
    assert not varies(flat[np.triu_indices(n, 1)])
    perm = MantelPermuter(n, 99, 0)
    got = perm.tests([x, flat, y], y)
    assert got[1] is None and [got[0], got[2]] == perm.many([x, y], y, perm.permuted(y))
    assert got[0] is not None and got[0].p == pytest.approx(1 / 100)
    assert perm.tests([x, y], flat) == [None, None]
