"""Every floor, count and exact enumeration at the users' sizes: 275 personas, 240 questions.

n!, 2**n and binomials of these counts are far beyond a float; each place that computes one is
run here at those sizes and checked against a value computed independently."""

import math

import numpy as np
import pytest
from factories import centroid_store
from scipy import stats

from tlpersona.analyses.compare.verdicts import mantel_floor
from tlpersona.analyses.stats import EXACT_SIGN_FLIP_MAX, paired_permutation, sign_flip_p
from tlpersona.analyses.subspace import SubspaceConfig, subspace
from tlpersona.cache import open_store
from tlpersona.interventions.steering.bootstrap import separated_ranks
from tlpersona.interventions.steering.verdict import (
    monotone_floor,
    monotonicity,
    questions_to_separate,
    rank_floor,
)

N_PERSONAS, N_QUESTIONS = 275, 240


def test_mantel_floor_at_275_personas_is_one_over_draws_plus_one():
    assert mantel_floor(N_PERSONAS, 4500) == pytest.approx(1 / 4501)
    # where n! is smaller than the draws, the relabellings are the floor
    assert mantel_floor(5, 1000) == pytest.approx(1 / math.factorial(5))


def test_sign_flips_at_275_personas_use_the_bound_and_it_is_valid():
    rng = np.random.default_rng(0)
    d = rng.normal(0.2, 1.0, size=(3, N_PERSONAS))
    p = sign_flip_p(d)
    assert N_PERSONAS > EXACT_SIGN_FLIP_MAX and np.all(np.isfinite(p)) and np.all(p <= 1)
    # the bound is conservative: never below a 20,000-draw Monte Carlo p beyond its error
    mc = paired_permutation(d, n_perm=20_000, seed=1)
    assert np.all(p >= mc - 4 * np.sqrt(mc * (1 - mc) / 20_000) - 1e-4)


def test_steering_floors_at_240_questions_are_finite():
    # 2**240 is exact as an int; the floor is what 1,000 sampled patterns give
    assert rank_floor(N_QUESTIONS, 21) == pytest.approx(21 * (1 + 2000 / 2**240) / 1001)
    assert rank_floor(N_QUESTIONS, 10**6) == 1.0
    # 2**10 > 1,000 draws: 21 (1 + 2000/1024) / 1001 = 0.062; at 11: 21 (1 + 2000/2048) / 1001 = 0.041
    assert questions_to_separate(21, 0.05) == 11
    assert monotone_floor(5) == pytest.approx(2 / 120)
    assert monotone_floor(40) == 0.0


def test_separated_ranks_at_240_questions():
    rng = np.random.default_rng(2)
    kl = [rng.normal(m, 1.0, size=N_QUESTIONS) for m in (0.0, 0.0, 1.0)]
    ranks = separated_ranks(kl, level=0.95)
    # entry 2 has a clearly larger KL (further from the goal): both others beat it
    assert ranks == [1, 1, 3]


def test_monotonicity_with_many_strengths_matches_scipy_spearman():
    strength = list(np.linspace(0, 4, 40))
    gain = [s + 0.1 * np.sin(7 * s) for s in strength]
    rho, p = monotonicity(strength, gain)
    assert rho == pytest.approx(stats.spearmanr(strength, gain).statistic)
    # 9,999 pairings drawn, none as extreme; two-sided doubles the smaller tail
    assert p == pytest.approx(2 / 10_000)


def test_subspace_runs_to_the_end_at_275_personas(tmp_path):
    rng = np.random.default_rng(4)
    n, d = N_PERSONAS, 12
    shared = rng.normal(size=(n, d))
    recipes = {p: shared + 0.3 * rng.normal(size=(n, d)) for p in ("last", "sys_end", "sys_end+1")}
    centroid_store(tmp_path / "s", recipes, [3])
    res = subspace(open_store(tmp_path / "s"), SubspaceConfig(k_max=4, n_null=20))
    comps = res.components
    (layer,) = res["layers"]
    assert res["n_personas"] == n
    # the first PCs of a shared geometry with small recipe noise agree across recipes
    assert layer["k_found"] is not None and layer["k_found"] >= 1
    assert comps[3].shape == (4, d)
