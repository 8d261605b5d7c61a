"""Metrics and permutation tests against independent numpy/scipy computations."""

import itertools

import numpy as np
import pytest
from scipy import stats
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import cosine

from tlpersona.analyses import metrics as M
from tlpersona.analyses.compare.result import Thresholds
from tlpersona.analyses.compare.verdicts import verdict
from tlpersona.analyses.stats import MantelPermuter, holm, mantel, paired_permutation, sign_flip_z


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


def _independent_held_out(x, y, fit, test, rank_cap):
    """One split, one direction, straight from the definition in d dimensions: centre with
    the fit half's mean, SVD of each recipe's centred fit rows, scipy's orthogonal Procrustes
    between the top-r coordinates, cosines of the rotated test rows."""
    mx, my = x[fit].mean(0), y[fit].mean(0)
    _, sx, vx = np.linalg.svd(x[fit] - mx, full_matrices=False)
    _, sy, vy = np.linalg.svd(y[fit] - my, full_matrices=False)
    r = min(len(fit) - 1, rank_cap, int((sx > sx[0] * 1e-9).sum()), int((sy > sy[0] * 1e-9).sum()))
    bx, by = vx[:r].T, vy[:r].T
    rot, _ = orthogonal_procrustes((x[fit] - mx) @ bx, (y[fit] - my) @ by)
    a, b = ((x[test] - mx) @ bx) @ rot, (y[test] - my) @ by
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_held_out_procrustes_equals_the_definition():
    rng = np.random.default_rng(3)
    for n, d in [(20, 50), (90, 40)]:  # rank n_fit - 1 and rank capped at MAX_RANK
        x, y = rng.normal(size=(n, d)) + 2.0, rng.normal(size=(n, d)) - 1.0
        h = M.HeldOutProcrustes(n, 2, np.random.default_rng(5), n_null=3)
        h.add("x", x)
        h.add("y", y)
        got = h.score_pairs([("x", "y")])[("x", "y")]
        want = np.zeros(n)
        for a, b in h.splits:
            want[b] += _independent_held_out(x, y, a, b, M.MAX_RANK)
            want[a] += _independent_held_out(x, y, b, a, M.MAX_RANK)
        np.testing.assert_allclose(got.per_persona, want / 2, atol=1e-8)


def test_held_out_procrustes_is_leak_free_under_the_null():
    """Recipes with unrelated persona geometry: the mean over many data sets is 0 (the old
    all-persona centring gave +0.36 at 8 personas and +0.13 at 26), and the relabelled null is
    calibrated (p < 0.05 about 5 % of the time)."""
    for n, bound in [(8, 0.1), (26, 0.05)]:
        means, ps = [], []
        for t in range(60):
            rng = np.random.default_rng(t)
            x = rng.normal(size=(n, 30)) + 3.0
            y = 2.0 * rng.normal(size=(n, 30)) - 1.0
            s = M.procrustes_score(x, y, seed=t, n_null=40).to_dict()
            means.append(s["mean"])
            ps.append(s["p"])
        assert abs(np.mean(means)) < bound
        assert np.mean(np.array(ps) < 0.05) <= 0.15


def test_held_out_procrustes_too_few_personas_is_said_not_computed():
    rng = np.random.default_rng(0)
    s = M.procrustes_score(rng.normal(size=(6, 5)), rng.normal(size=(6, 5))).to_dict()
    assert s["mean"] is None and "too few personas" in s["reason"]


def test_identical_recipes_score_one():
    """A recipe against itself is 1 for every persona (the old fit-span map gave well under 1)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(26, 300))
    s = M.procrustes_score(x, x, n_null=5)
    np.testing.assert_allclose(s.per_persona, 1.0, atol=1e-9)


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
    s = M.procrustes_score(x, y, seed=0, n_null=50).to_dict()
    assert s["min"] > 0.999
    assert s["null_p95"] < 0.5 and s["p"] == pytest.approx(1 / 51)
    assert s["z"] > 5


def test_shared_rotated_geometry_stays_above_the_null_with_few_personas():
    rng = np.random.default_rng(7)
    for n in (8, 26):
        x = rng.normal(size=(n, 64)) * np.r_[np.full(6, 4.0), np.full(58, 0.3)]
        rot, _ = np.linalg.qr(rng.normal(size=(64, 64)))
        y = x @ rot + 5.0 + 0.3 * rng.normal(size=(n, 64))
        s = M.procrustes_score(x, y, n_null=50).to_dict()
        assert s["mean"] > 0.9 > s["null_p95"] + 0.3
        assert s["p"] == pytest.approx(1 / 51)


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


def test_paired_permutation_detects_shift_and_is_exact_when_enumerable():
    rng = np.random.default_rng(10)
    d = np.stack([rng.normal(size=30) + 0.8, rng.normal(size=30)])
    p = paired_permutation(d, n_perm=499, seed=1)
    assert p[0] < 0.01 and p[1] > 0.01
    assert p.min() >= 1 / 500
    # 2^8 = 256 <= 1000: every sign pattern, counted by hand
    small = rng.normal(size=(3, 8)) + np.array([[0.0], [0.4], [1.5]])
    got = paired_permutation(small, n_perm=1000, seed=0)
    for row, g in zip(small, got, strict=True):
        flips = np.array(list(itertools.product([-1.0, 1.0], repeat=8)))
        null = np.abs((flips * row).mean(axis=1))
        assert g == pytest.approx(np.mean(null >= abs(row.mean()) - 1e-12))


def test_sign_flip_z_uses_the_exact_null_sd():
    rng = np.random.default_rng(4)
    d = rng.normal(size=(1, 12)) + 0.3
    flips = np.array(list(itertools.product([-1.0, 1.0], repeat=12)))
    null = (flips * d[0]).mean(axis=1)
    z = sign_flip_z(d)
    assert z[0] == pytest.approx(d[0].mean() / null.std())


def test_holm_against_its_definition():
    rng = np.random.default_rng(11)
    p = rng.uniform(0, 0.2, size=9)
    p[3] = np.nan
    got = holm(p)
    ok = [i for i in range(9) if not np.isnan(p[i])]
    order = sorted(ok, key=lambda i: p[i])
    m = len(ok)
    for rank, i in enumerate(order):
        want = min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1)))
        assert got[i] == pytest.approx(want)
    assert np.isnan(got[3])


@pytest.mark.parametrize("min_cos, mc_r, rho, gate, want", [
    (0.96, 0.91, None, False, "PASS"), (0.96, 0.91, 0.81, True, "PASS"),
    (0.96, 0.91, 0.79, True, "GREY"), (0.96, 0.91, 0.79, False, "PASS"),
    (0.95, 0.91, None, False, "GREY"), (0.96, 0.90, None, False, "GREY"),
    (0.849, 0.99, None, False, "KILL"), (0.99, 0.699, 0.99, True, "KILL"),
    (0.85, 0.70, None, False, "GREY"),
])
def test_verdict_boundaries(min_cos, mc_r, rho, gate, want):
    assert verdict(min_cos, mc_r, rho, Thresholds(gate_spread=gate)) == want


@pytest.mark.parametrize("mantel_p, want", [(0.049, "PASS"), (0.05, "GREY"), (0.5, "GREY")])
def test_pass_needs_the_geometry_beyond_its_mantel_null(mantel_p, want):
    assert verdict(0.99, 0.99, None, Thresholds(), mantel_p, 0.05) == want
    assert verdict(0.5, 0.99, None, Thresholds(), mantel_p, 0.05) == "KILL"


def test_unrelated_recipes_with_few_personas_rarely_pass():
    """Planted null: two recipes with a large shared offset (so min cos is high) and one
    persona direction each, independent. With 5 personas the bounds alone pass ~9 % of such
    cells; with the Mantel gate PASS stays at its level."""
    rng = np.random.default_rng(0)
    n, d, draws = 5, 30, 400
    bounds = gated = 0
    for _ in range(draws):
        off = 10 * rng.normal(size=d)
        x, y = (rng.normal(size=(n, 1)) * rng.normal(size=(1, d)) + off for _ in range(2))
        min_cos = float(M.rowwise_cos(x, y).min())
        mx, my = M.cos_matrix(M.mean_centre(x)), M.cos_matrix(M.mean_centre(y))
        r, p = mantel(mx, my, n_perm=199, seed=int(rng.integers(1 << 30)))
        bounds += verdict(min_cos, r, None, Thresholds()) == "PASS"
        gated += verdict(min_cos, r, None, Thresholds(), p, 0.05) == "PASS"
    assert bounds / draws > 0.05 and gated / draws <= 0.05


@pytest.mark.parametrize("obs, ceil, mantel_p, want", [
    ((0.94, 0.95), (0.94, 0.95), 0.001, True),    # misses PASS where identical recipes do too
    ((0.94, 0.95), (0.94, 0.95), 0.6, False),     # the Mantel condition has no ceiling
    ((0.90, 0.60), (0.99, 0.60), 0.001, False),   # min cos 0.90 against a ceiling of 0.99
    ((0.97, 0.60), (0.99, 0.60), 0.001, True),    # KILL on r, and identical recipes' r is KILL too
    ((0.97, 0.50), (0.99, 0.80), 0.001, False),   # KILL at 0.5 where identical recipes reach 0.8
    ((0.97, 0.95), (0.99, 0.99), 0.001, False),   # PASS
])
def test_within_noise_needs_every_missed_bound_missed_by_its_ceiling(obs, ceil, mantel_p, want):
    from tlpersona.analyses.compare.verdicts import within_noise

    ceiling = {"per_persona_cos_min": ceil[0], "matrix_mc_pearson": ceil[1]}
    assert within_noise(*obs, None, ceiling, Thresholds(), mantel_p, 0.05) is want
