"""The shared subspace's per-PC test (an intersection–union test over recipe pairs): checked
against a direct computation, calibrated on planted nulls (unrelated recipes, and two of three
recipes sharing while the third is unrelated), and powered on a planted shared subspace; the
relabelled-refit test it replaces fails the partial-sharing null."""

import itertools

import numpy as np
import pytest
from factories import (
    PLANTED_PAIRS,
    PLANTED_POSITIONS,
    MemorySource,
    allowed,
    harder_planted,
    planted_recipes,
    relabel_count,
)
from scipy import stats

from tlpersona.analyses.kfound import (
    ALPHA,
    count_shared,
    label_permutations,
    pc_level,
    perm_count,
)
from tlpersona.analyses.subspace import SubspaceConfig, held_out, subspace

POS, PAIRS = PLANTED_POSITIONS, PLANTED_PAIRS
# the first and last recipe share; the last is the one the replaced test relabelled
PARTIAL = ("last", "sys_end+1")


def split(n, rng):
    perm = rng.permutation(n)
    return perm[: n // 2], perm[n // 2:]


def iut_k(raw, fit, test, perms, level):
    scores = held_out(raw, POS, PAIRS, fit, test, 50, True, curve=False)[2]
    return count_shared(scores, PAIRS, perms, level).k or 0


def test_count_matches_scipy_pearson_over_each_permutation():
    """Each pair's p, the PC's p (the largest pair p), the count's sequential stop and the bar
    against a plain loop: scipy's Pearson r for every permutation, one pair and PC at a time."""
    rng = np.random.default_rng(2)
    n, n_pc = 9, 4
    z = rng.normal(size=(n, n_pc))
    own = np.where([1, 1, 0, 1], z, rng.normal(size=(n, n_pc)))  # c does not share PC 3
    scores = {p: x + 0.2 * rng.normal(size=(n, n_pc)) for p, x in (("a", z), ("b", z), ("c", own))}
    pairs = list(itertools.combinations(scores, 2))
    perms = label_permutations(n, 199, rng)
    assert sorted(perms[7].tolist()) == list(range(n))
    got = count_shared(scores, pairs, perms, 0.05)
    for j in range(n_pc):
        want = {}
        for x, y in pairs:
            r = stats.pearsonr(scores[x][:, j], scores[y][:, j])[0]
            null = [stats.pearsonr(scores[x][:, j], scores[y][q, j])[0] for q in perms]
            want[f"{x}~{y}"] = (1 + sum(v >= r - 1e-12 for v in null)) / 200
            # the bar: an r just above it passes, just below it does not
            bar = -np.sort(-np.array(null))[int(np.ceil(0.05 * 200)) - 2]
            assert ((1 + sum(v >= bar + 1e-9 for v in null)) / 200 < 0.05
                    <= (1 + sum(v >= bar - 1e-9 for v in null)) / 200)
        assert got.per_pc_pair_p[j] == pytest.approx(want)
        assert got.per_pc_p[j] == pytest.approx(max(want.values()))
    k = 0
    while k < n_pc and got.per_pc_p[k] < 0.05:
        k += 1
    assert got.k == (k or None) and got.k == 2  # PC 3 fails for c, PC 4 is not counted
    assert got.p == got.per_pc_p[0]
    short = count_shared(scores, pairs, perms, 0.05, full=False)
    assert short.k == got.k and len(short.per_pc_p) == 3  # stopped at the first failure


def test_permutation_count_reaches_the_level():
    for layers in (1, 4, 32):
        for n_perm in (perm_count(layers, None), perm_count(layers, 1)):
            assert 1 / (n_perm + 1) < pc_level(layers)
    assert perm_count(4, None) == 2000 and perm_count(32, None) == 12800
    assert perm_count(4, 5) == 80 and perm_count(4, 500) == 500


@pytest.mark.parametrize("n", [5, 8, 26])
@pytest.mark.parametrize("case", ["unrelated", "partial"])
def test_a_layer_is_called_at_most_at_the_level(n, case):
    """Calibration at one layer (level 0.05): unrelated recipes, and two of three recipes
    sharing a 3-dim geometry beside an unrelated third, reach k_found ≥ 1 in ≤ 5 % of runs
    plus 2.5 Monte Carlo standard errors (300 runs)."""
    rng = np.random.default_rng(10 * n + len(case))
    runs, hits = 300, 0
    for _ in range(runs):
        fit, test = split(n, rng)
        perms = label_permutations(len(test), perm_count(1, None), rng)
        raw = planted_recipes(n, rng, PARTIAL if case == "partial" else ())
        hits += bool(iut_k(raw, fit, test, perms, ALPHA))
    assert hits / runs <= allowed(ALPHA, runs), hits


def test_the_replaced_relabelled_test_fails_partial_sharing_and_this_one_does_not():
    """26 personas, two of three recipes sharing, one layer at 0.05, the same 300 data sets:
    the relabelled-refit test (39 draws) calls the layer in 14 % of runs; the per-PC
    intersection–union test stays at the level."""
    rng = np.random.default_rng(7)
    runs, old, new = 300, 0, 0
    for _ in range(runs):
        raw = planted_recipes(26, rng, PARTIAL)
        fit, test = split(26, rng)
        perms = label_permutations(len(test), perm_count(1, None), rng)
        new += bool(iut_k(raw, fit, test, perms, ALPHA))
        old += bool(relabel_count(raw, fit, test, [rng.permutation(26) for _ in range(39)], ALPHA))
    assert old / runs > allowed(ALPHA, runs), old
    assert new / runs <= allowed(ALPHA, runs), new


def _layers(rng, n, n_layers, shared_by):
    """``n_layers`` independent layers of :func:`planted_recipes`, as a source ``[persona, layer, d]``."""
    per = [planted_recipes(n, rng, shared_by) for _ in range(n_layers)]
    return MemorySource({p: np.stack([lay[p] for lay in per], axis=1) for p in POS}, n_layers)


def test_the_shipped_family_over_four_layers_is_calibrated_under_partial_sharing():
    """Through subspace() as shipped (4 layers, each PC at 0.0125, Holm over every layer): two of
    three recipes sharing at every layer, a layer called beyond chance in ≤ 5 % of runs plus
    MC error; the Holm p is the layer's p (1 when nothing was found) adjusted over all four."""
    from tlpersona.analyses.stats import holm

    rng = np.random.default_rng(3)
    runs, called = 150, 0
    for seed in range(runs):
        data = subspace(_layers(rng, 26, 4, PARTIAL), SubspaceConfig(n_null=0, k_max=3,
                                                                   seed=seed))
        layers = data["layers"]
        assert data["n_permutations"] == 2000 and data["null"]["pc_level"] == ALPHA / 4
        ps = [1.0 if lay["k_found_p"] is None else lay["k_found_p"] for lay in layers]
        assert [lay["k_found_p_holm"] for lay in layers] == pytest.approx(list(holm(ps)))
        assert all((lay["k_found_p_holm"] < ALPHA) == bool(lay["k_found"]) for lay in layers)
        called += any(lay["k_found"] for lay in layers)
    assert called / runs <= allowed(ALPHA, runs), called


@pytest.mark.parametrize("n", [26, 40])
def test_a_planted_five_dimensional_subspace_is_still_found(n):
    """Power at the shipped level (4 layers: 0.0125 per PC, 2,000 permutations): a planted
    5-dim recipe-invariant subspace is called at every seed, counted 5 ± 1 at 40 personas in
    two of three seeds (both tests count the first seed as 3), and at most one PC below the
    replaced relabelled-refit test (80 draws) on the same data."""
    got, old = [], []
    for seed in range(3):
        rng = np.random.default_rng(500 + seed)
        raw = harder_planted(n, rng)
        fit, test = split(n, rng)
        level = pc_level(4)
        got.append(iut_k(raw, fit, test, label_permutations(len(test), 2000, rng), level))
        old.append(relabel_count(raw, fit, test, [rng.permutation(n) for _ in range(80)], level))
    assert all(k >= 1 for k in got), got
    if n == 40:
        assert sum(abs(k - 5) <= 1 for k in got) >= 2, got
    assert all(k >= k_old - 1 for k, k_old in zip(got, old, strict=True)), (got, old)


def test_few_held_out_personas_cannot_pass_and_the_report_says_so():
    """Four held-out personas (8 in all) have 24 orderings: even identical recipes get a pair p
    of about 1/24 > 0.0125 (4 layers), so nothing can be called, and the limits text says how
    many personas would be needed (5 held out: 1/120 < 0.0125, so 9)."""
    from tlpersona.analyses.subspace_result import limits_text

    rng = np.random.default_rng(4)
    z = rng.normal(size=(4, 3))
    scores = {p: z * (1 + i) for i, p in enumerate(POS)}
    count = count_shared(scores, PAIRS, label_permutations(4, 2000, rng), pc_level(4))
    assert count.k is None
    assert count.per_pc_p[0] == pytest.approx(1 / 24, abs=3 * np.sqrt(1 / 24 / 2000))
    text = limits_text(2000, 4, 4)
    assert "With 4 held-out personas no PC can pass" in text and "at least 9 personas" in text
    assert "no PC can pass" not in limits_text(2000, 4, 5)
