"""Metrics and permutation tests against independent numpy/scipy computations."""

import numpy as np
import pytest
from scipy import stats
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import cosine

from tlpersona.analyses import metrics as M
from tlpersona.analyses.compare import Thresholds, verdict
from tlpersona.analyses.stats import MantelPermuter, mantel, paired_permutation


def test_rowwise_cos_and_matrices_match_scipy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    want = np.array([1 - cosine(a, b) for a, b in zip(x, y, strict=True)])
    np.testing.assert_allclose(M.rowwise_cos(x, y), want, atol=1e-12)
    cm = np.array([[1 - cosine(a, b) for b in x] for a in x])
    np.testing.assert_allclose(M.cos_matrix(x), cm, atol=1e-12)
    iu = np.triu_indices(7, k=1)
    got = M.matrix_agreement(x, y)
    assert got["pearson"] == pytest.approx(np.corrcoef(cm[iu], M.cos_matrix(y)[iu])[0, 1])
    assert got["spearman"] == pytest.approx(stats.spearmanr(cm[iu], M.cos_matrix(y)[iu])[0])
    np.testing.assert_allclose(M.mean_centre(x).mean(0), 0, atol=1e-12)


def test_spread_matches_explicit_loop():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(6, 4, 8))
    valid = np.ones((6, 4), bool)
    valid[0, 1] = valid[3, 1] = False
    got = M.spread(v, valid)
    for q in range(4):
        rows = [v[p, q] / np.linalg.norm(v[p, q]) for p in range(6) if valid[p, q]]
        mean = np.mean(rows, axis=0)
        want = np.mean([np.sum((r - mean) ** 2) for r in rows])
        assert got[q] == pytest.approx(want, rel=1e-5)


def test_thin_procrustes_equals_scipy_when_full_rank():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 6)), rng.normal(size=(12, 6))
    qa, m, qb = M.thin_procrustes(a, b)
    r_scipy, _ = orthogonal_procrustes(a, b)
    np.testing.assert_allclose(qa @ m @ qb.T, r_scipy, atol=1e-10)


def test_planted_rotation_plus_offset():
    """Two recipes that are a rotation + offset of each other: raw cos << 1, mc r = 1,
    Procrustes cos ~ 1 on held-out personas."""
    rng = np.random.default_rng(4)
    n, d = 40, 16
    x = rng.normal(size=(n, d)) + 3.0
    rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
    y = x @ rot + 10.0 * rng.normal(size=d)
    assert M.rowwise_cos(x, y).mean() < 0.5
    assert M.matrix_agreement(M.mean_centre(x), M.mean_centre(y))["pearson"] == pytest.approx(1.0)
    assert M.procrustes_cos(x, y, np.random.default_rng(0)).min() > 0.999


def _naive_mantel(x, y, n_perm, seed):
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(x.shape[0]) for _ in range(n_perm)]
    iu = np.triu_indices(x.shape[0], k=1)
    r_obs = np.corrcoef(x[iu], y[iu])[0, 1]
    r_perm = np.array([np.corrcoef(x[iu], y[p][:, p][iu])[0, 1] for p in perms])
    return r_obs, (1 + np.sum(r_perm >= r_obs - 1e-6)) / (n_perm + 1)


def test_mantel_matches_naive_loop():
    rng = np.random.default_rng(5)
    base = M.cos_matrix(rng.normal(size=(15, 6)))
    noisy = M.cos_matrix(rng.normal(size=(15, 6)))
    y = 0.3 * base + noisy
    r, p = mantel(base, y, n_perm=199, seed=7)
    r_want, p_want = _naive_mantel(base, y, 199, 7)
    assert r == pytest.approx(r_want, abs=1e-6)
    assert p == pytest.approx(p_want)


def test_mantel_p_range_planted_and_null():
    rng = np.random.default_rng(6)
    x = M.cos_matrix(rng.normal(size=(20, 5)))
    _, p_same = mantel(x, x + 0.01 * M.cos_matrix(rng.normal(size=(20, 5))), n_perm=199, seed=0)
    assert p_same == pytest.approx(1 / 200)
    ps = []
    for k in range(60):
        a = M.cos_matrix(rng.normal(size=(12, 4)))
        b = M.cos_matrix(rng.normal(size=(12, 4)))
        ps.append(mantel(a, b, n_perm=99, seed=k)[1])
    ps = np.array(ps)
    assert ps.min() >= 1 / 100 and ps.max() <= 1
    assert stats.kstest(ps, "uniform").pvalue > 0.01  # roughly uniform under the null


def test_mantel_spearman_is_pearson_of_ranks():
    rng = np.random.default_rng(8)
    x, y = (M.cos_matrix(rng.normal(size=(10, 3))) for _ in range(2))
    r, _ = mantel(x, y, n_perm=9, seed=0, method="spearman")
    iu = np.triu_indices(10, k=1)
    assert r == pytest.approx(stats.spearmanr(x[iu], y[iu])[0], abs=1e-6)


def test_permuter_reuse_is_consistent():
    rng = np.random.default_rng(9)
    x, y = (M.cos_matrix(rng.normal(size=(9, 3))) for _ in range(2))
    perm = MantelPermuter(9, 50, 3)
    assert perm.permuted(y).shape == (50, 36)
    np.testing.assert_allclose(np.linalg.norm(perm.permuted(y), axis=1), 1, atol=1e-5)


def test_paired_permutation_matches_naive_and_detects_shift():
    rng = np.random.default_rng(10)
    d = np.stack([rng.normal(size=30) + 0.8, rng.normal(size=30)])
    p = paired_permutation(d, n_perm=499, seed=1)
    rng2 = np.random.default_rng(1)
    signs = rng2.choice(np.array([-1.0, 1.0]), size=(499, 30))
    for row, got in zip(d, p, strict=True):
        null = np.abs((signs * row).mean(axis=1))
        want = (1 + np.sum(null >= abs(row.mean()) - 1e-12)) / 500
        assert got == pytest.approx(want)
    assert p[0] < 0.01 and p[1] > 0.01


@pytest.mark.parametrize("min_cos, mc_r, rho, want", [
    (0.96, 0.91, None, "PASS"), (0.96, 0.91, 0.81, "PASS"), (0.96, 0.91, 0.79, "GREY"),
    (0.95, 0.91, None, "GREY"), (0.96, 0.90, None, "GREY"), (0.849, 0.99, None, "KILL"),
    (0.99, 0.699, 0.99, "KILL"), (0.85, 0.70, None, "GREY"),
])
def test_verdict_boundaries(min_cos, mc_r, rho, want):
    assert verdict(min_cos, mc_r, rho, Thresholds()) == want
