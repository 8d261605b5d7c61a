"""The comparison's corrected tests with their shipped defaults: calibrated on planted nulls and
able to call planted effects at the sizes users run (5-40 personas on a CPU, 275 on a GPU)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from factories import centroid_store
from scipy import stats

from tlpersona.analyses import metrics as M
from tlpersona.analyses.compare import CompareConfig, compare
from tlpersona.analyses.compare.verdicts import mantel_floor
from tlpersona.analyses.stats import BENTKUS_C, draws_for_family, holm, mantel, sign_flip_p
from tlpersona.cache import open_store


def _exact_sign_flip(row: np.ndarray) -> float:
    """Every sign pattern, by brute force."""
    t = abs(row.sum())
    sums = np.array([abs(np.dot(s, row)) for s in itertools.product((1.0, -1.0), repeat=row.size)])
    return float(np.mean(sums >= t - 1e-9 * np.abs(row).sum()))


def test_sign_flip_p_is_the_exact_enumeration():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8, 11):
        d = rng.normal(0.3, 1.0, size=(6, n))
        d[0] = np.round(d[0], 1)  # ties between patterns
        d[1] = 0.0  # nothing to test: p = 1
        got = sign_flip_p(d)
        assert got == pytest.approx([_exact_sign_flip(r) for r in d], abs=1e-12)
        ref = stats.permutation_test((d,), lambda x, axis: np.abs(np.mean(x, axis=axis)),
                                     permutation_type="samples", vectorized=True, axis=1,
                                     n_resamples=10**6, alternative="greater").pvalue
        assert got == pytest.approx(ref, abs=1e-12)
    assert sign_flip_p(np.ones((1, 5)))[0] == pytest.approx(2 / 2**5)  # the floor, both tails


def test_sign_flip_p_at_26_personas_matches_monte_carlo():
    rng = np.random.default_rng(1)
    d = rng.normal(0.25, 1.0, size=(4, 26))
    signs = rng.choice([-1.0, 1.0], size=(200_000, 26))
    mc = [np.mean(np.abs(signs @ r) >= abs(r.sum()) - 1e-12) for r in d]
    assert sign_flip_p(d) == pytest.approx(mc, abs=0.004)


def test_bentkus_bound_is_never_below_the_exact_p():
    """Beyond exact counting the bound is used; it must stay above the exact tail wherever both
    can be computed, for light and heavy tails alike."""
    assert BENTKUS_C == pytest.approx(3.178, abs=1e-3)
    rng = np.random.default_rng(2)
    for n in (12, 16, 20):
        d = np.concatenate([rng.normal(0.5, 1, size=(40, n)), rng.standard_t(1.5, size=(40, n)) + 0.5])
        exact = sign_flip_p(d)
        z = np.abs(d.sum(1)) / np.sqrt((d * d).sum(1))
        bound = np.minimum(1, 2 * BENTKUS_C * stats.norm.sf(z))
        assert np.all(bound >= exact - 1e-12)
    big = rng.normal(0.6, 1, size=(3, 60))  # the bound's own path
    z = np.abs(big.sum(1)) / np.sqrt((big * big).sum(1))
    assert sign_flip_p(big) == pytest.approx(np.minimum(1, 2 * BENTKUS_C * stats.norm.sf(z)))


@pytest.mark.parametrize("n", [5, 8, 26])
def test_paired_tests_calibrated_and_powered(n):
    """Null differences (symmetric, heavy-tailed) are called at most at the nominal rate; a
    per-persona shift of one standard deviation is called at 8 and 26 personas."""
    rng = np.random.default_rng(n)
    null = rng.standard_t(3, size=(2000, n))
    rate = np.mean(sign_flip_p(null) < 0.05)
    assert rate <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 2000)
    if n >= 8:
        shifted = rng.normal(1.0, 1.0, size=(400, n))
        assert np.mean(sign_flip_p(shifted) < 0.05) > (0.5 if n == 8 else 0.99)


def test_family_sized_draws_reach_alpha():
    for m in (1, 12, 84, 112, 420):
        n = draws_for_family(m, 0.05)
        assert n >= 1000 and n % 100 == 0
        assert m / (n + 1) <= 0.05 / 2  # every floor cell survives Holm with room to spare
    assert draws_for_family(112, 0.05) == 4500 and draws_for_family(84, 0.05) == 3400


@pytest.mark.parametrize("n", [5, 8, 26])
def test_mantel_with_family_draws_is_calibrated(n):
    """Unrelated persona geometries: the Mantel p is below 0.05 at most at the nominal rate."""
    rng = np.random.default_rng(10 + n)
    runs = 150
    hits = 0
    for k in range(runs):
        a, b = (M.cos_matrix(rng.normal(size=(n, 6))) for _ in range(2))
        hits += mantel(a, b, n_perm=draws_for_family(1, 0.05), seed=k)[1] < 0.05
    assert hits / runs <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / runs)


LAYERS = [1, 2, 3, 4]
RECIPES = ["last", "response_mean", "prompt_mean", "raw_system_last", "sys_end", "sys_end+1",
           "prompt_mean_no_last", "prompt_mean_no_first"]


def _two_group_store(path, n=26, d=24, noise=0.6, seed=0):
    """Eight question-invariant recipes over four layers (112 cells, the quick start's family):
    the first four share one persona geometry (each with its own noise), the last four share
    another, unrelated one."""
    rng = np.random.default_rng(seed)
    geo = [rng.normal(size=(n, len(LAYERS), d)) for _ in range(2)]
    recipes = {r: geo[i // 4] + noise * rng.normal(size=(n, len(LAYERS), d))
               for i, r in enumerate(RECIPES)}
    return centroid_store(path, recipes, LAYERS, questions=["0", "1"])


def test_default_compare_calls_planted_agreement_and_nothing_else(tmp_path):
    """With the shipped defaults, the 48 same-geometry cells of a 112-cell run are called beyond
    chance after Holm, the 64 unrelated ones are not, and the summary says how many."""
    res = compare(_two_group_store(tmp_path / "s"), CompareConfig(positions=RECIPES, n_null=3))
    assert res["permutations_auto"] and res["n_permutations"] == 4500
    assert res["min_attainable_p_holm"] == pytest.approx(112 / 4501)
    same = [c for c in res["cells"] if RECIPES.index(c["pair"][0]) // 4 == RECIPES.index(c["pair"][1]) // 4]
    other = [c for c in res["cells"] if c not in same]
    assert len(same) == 48 and len(other) == 64
    called = [c["matrix_mc"]["mantel_p_holm"] < 0.05 for c in same]
    assert all(called)
    assert not any(c["matrix_mc"]["mantel_p_holm"] < 0.05 for c in other)
    assert "48 of 112 cells have mean-centred persona geometries more alike" in res["overall"]["sentence"]
    assert "geometry beyond chance in 48/112 cells" in res["overall"]["answer"]
    # the paired tests: exact at 26 personas, and they separate same-geometry pairs from
    # cross-group pairs sharing a recipe
    assert res["paired_test"] == "exact sign-flip enumeration"
    ps = np.array([t["p"] for t in res["paired_tests"]])
    assert holm(ps) == pytest.approx([t["p_holm"] for t in res["paired_tests"]])
    assert min(t["p_holm"] for t in res["paired_tests"]) < 0.05


def test_overall_at_the_users_scale_does_not_overflow(tmp_path):
    """275 personas: n! is far beyond a float, the floor is 1 / (N + 1)."""
    assert mantel_floor(275, 3400) == pytest.approx(1 / 3401)
    assert mantel_floor(4, 1000) == pytest.approx(1 / 24)
    assert mantel_floor(7, 10_000) == pytest.approx(1 / 5040)
    rng = np.random.default_rng(3)
    n, d = 275, 8
    g = rng.normal(size=(n, 1, d))
    rec = {p: g + 0.3 * rng.normal(size=(n, 1, d)) for p in ("sys_end", "raw_system_last")}
    centroid_store(tmp_path / "s", rec, [1])
    res = compare(open_store(tmp_path / "s"), CompareConfig(n_null=2))
    assert res["n_personas"] == 275 and res["overall"]["answer"]
    assert res["paired_test"].startswith("Bentkus")
    (cell,) = res["cells"]
    assert cell["matrix_mc"]["mantel_p_holm"] == pytest.approx(1 / 1001)
