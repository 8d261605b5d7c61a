""""Beyond random" for steering on planted nulls and planted effects, with no model: the
t-prediction p against scipy's two-sample t-test, its false-positive rate on pools shaped like
the model's (normal, left-skewed) and where the shape check must step in (right-skewed), its
power on the default experiment's numbers, the floors the report words, and ``answer()``."""

import math

import numpy as np
import pytest
from scipy import stats

from tlpersona.analyses.stats import holm
from tlpersona.interventions import steering as S
from tlpersona.interventions.selection import PersonaChoice
from tlpersona.interventions.steering.bootstrap import (
    Estimate,
    beyond_random,
    rank_p,
    t_prediction_needed,
    t_prediction_p,
)
from tlpersona.interventions.steering.config import Setting
from tlpersona.interventions.steering.result import Arm, CurvePoint, RecipeScore
from tlpersona.interventions.steering.verdict import (
    ANSWER_CHARS,
    _verdict,
    monotone_floor,
    monotonicity,
    questions_to_separate,
    rank_floor,
)

#: The default experiment's `add` run (SmolLM2-135M, L15 alpha 0.125, 3 targets × 3 scoring
#: questions, seed 0): the 10 random directions' effects and the `last` recipe's own effect.
DEFAULT_POOL = [-0.3183, -0.2197, -0.0283, 0.0629, -0.0106, -0.1359, -0.1316, -0.3739, -0.0769,
                -0.0841]
DEFAULT_OWN = 0.515
FAMILY = 8  # recipes × operators in the default experiment
K = 10


def _mc_ceiling(rate: float, reps: int) -> float:
    """Nominal rate plus three Monte Carlo standard errors."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / reps)


def test_t_prediction_p_is_scipys_one_sided_two_sample_t_test():
    """With one own value against k pooled ones, Student's equal-variance t-test has pooled sd
    = the pool's sd and k - 1 degrees of freedom: the same p, computed another way."""
    rng = np.random.default_rng(0)
    for k in (3, 10, 40):
        pool = rng.normal(size=k)
        for own in (-1.0, 0.3, 2.5):
            want = stats.ttest_ind([own], pool, alternative="greater").pvalue
            assert t_prediction_p(own, pool) == pytest.approx(want, rel=1e-10)
    assert math.isnan(t_prediction_p(1.0, [0.0, 1.0]))  # too few to estimate a spread
    assert math.isnan(t_prediction_p(1.0, [0.5] * 5))
    # the own value that reaches p exactly
    pool = rng.normal(size=10)
    need = t_prediction_needed(pool, 0.05 / 8)
    assert t_prediction_p(need, pool) == pytest.approx(0.05 / 8, rel=1e-8)


def _rates(draw, reps: int, seed: int, alphas=(0.05, 0.05 / FAMILY)) -> dict:
    """False-positive rates of the guarded test, the unguarded t-prediction and the rank p: a
    pool of K draws and one more draw as "own" (a random vector in place of a persona's)."""
    rng = np.random.default_rng(seed)
    x = draw(rng, (reps, K + 1))
    res = [beyond_random(float(r[K]), r[:K]) for r in x]
    guarded = np.array([t.p for t in res])
    plain = np.array([t.t_p for t in res])
    ranks = np.array([t.rank_p for t in res])
    return {a: ((guarded < a).mean(), (plain < a).mean(), (ranks < a).mean()) for a in alphas}


def _skewnorm(a: float):
    return lambda rng, size: stats.skewnorm.rvs(a, size=size, random_state=rng)


@pytest.mark.parametrize("name, draw", [
    ("normal", lambda rng, size: rng.normal(size=size)),
    # the model's pools: a random push of fixed norm hurts more than it helps (skew -0.39)
    ("left-skewed", _skewnorm(-1.78)),
])
def test_planted_nulls_are_called_at_most_at_the_nominal_rate(name, draw):
    reps = 6000
    for a, (guarded, plain, ranks) in _rates(draw, reps, seed=1).items():
        assert guarded <= _mc_ceiling(a, reps), (name, a, guarded)
        assert plain <= _mc_ceiling(a, reps), (name, a, plain)
        assert ranks <= _mc_ceiling(a, reps)
    # normal pools: the unguarded t-prediction is exact, so its rate is at the nominal one
    if name == "normal":
        plain = _rates(draw, reps, seed=1)[0.05][1]
        assert abs(plain - 0.05) < 3 * math.sqrt(0.05 * 0.95 / reps)


def test_right_skewed_pools_break_the_t_prediction_and_the_shape_check_catches_it():
    """A pool with a long upper tail (skewness +0.79) makes the plain t-prediction ~3× too
    liberal at the Holm threshold of the default family; with the check it stays within
    Monte Carlo error of nominal there (and far below it at 0.05)."""
    reps = 12000
    rates = _rates(_skewnorm(4.0), reps, seed=2)
    a = 0.05 / FAMILY
    guarded, plain, _ = rates[a]
    assert plain > 2 * a
    assert guarded <= _mc_ceiling(a, reps)
    assert rates[0.05][0] <= 0.05


def test_a_whole_planted_family_stays_within_the_family_wise_rate():
    """8 recipes whose vectors are random directions, on two settings that share a pool of 10
    each (as recipes selected at the same strength do), Holm over the 8."""
    rng = np.random.default_rng(3)
    reps, calls = 3000, 0
    for _ in range(reps):
        pools = stats.skewnorm.rvs(-1.78, size=(2, K), random_state=rng)
        own = stats.skewnorm.rvs(-1.78, size=FAMILY, random_state=rng)
        p = [beyond_random(float(o), pools[i % 2]).p for i, o in enumerate(own)]
        calls += bool((holm(p) < 0.05).any())
    assert calls / reps <= _mc_ceiling(0.05, reps)


def test_the_default_experiments_last_is_called_after_holm_over_eight():
    pool = np.array(DEFAULT_POOL)
    assert pool.min() == pytest.approx(-0.374, abs=1e-3) and pool.max() == pytest.approx(0.063, abs=1e-3)
    assert pool.mean() == pytest.approx(-0.132, abs=1e-3)
    assert pool.std(ddof=1) == pytest.approx(0.137, abs=1e-3)
    res = beyond_random(DEFAULT_OWN, pool)
    assert res.test == "t" and res.shape_ok and res.skew == pytest.approx(stats.skew(pool, bias=False))
    want = stats.ttest_ind([DEFAULT_OWN], pool, alternative="greater").pvalue
    assert res.p == pytest.approx(want) and res.p * FAMILY < 0.05  # 0.00076 → Holm 0.006
    assert res.rank_p == pytest.approx(1 / 11)  # the exact rank p alone can never get there
    others = [0.5] * (FAMILY - 1)  # whatever the other recipes' p are, the smallest gets × 8
    assert holm([res.p, *others])[0] == pytest.approx(FAMILY * res.p)
    assert FAMILY * res.p < 0.05
    # the exact alternative needs ⌈8 / 0.05⌉ = 160 directions to get below 0.05 after Holm
    assert FAMILY * rank_p(DEFAULT_OWN, np.full(160, 0.0)) < 0.05 <= \
        FAMILY * rank_p(DEFAULT_OWN, np.full(159, 0.0))


def test_power_on_pools_like_the_models_at_the_default_effect():
    """The own effect 4.7 pool-sds above the pool mean, as in the default run: called after
    Holm over 8 in most draws of a pool of 10 (the shape check costs the right-skewed draws)."""
    rng = np.random.default_rng(4)
    law = stats.skewnorm(-1.78)
    mu, sd = law.mean(), law.std()
    called = [beyond_random(mu + 4.72 * sd, law.rvs(size=K, random_state=rng)).p * FAMILY < 0.05
              for _ in range(2000)]
    assert np.mean(called) > 0.5


def test_test_choice_and_fallback():
    pool = [0.0, 0.1, 0.2, 0.3, 2.0]  # long upper tail
    res = beyond_random(3.0, pool)
    assert res.skew > 0 and not res.shape_ok and res.test == "rank" and res.p == res.rank_p
    assert beyond_random(DEFAULT_OWN, DEFAULT_POOL, "rank").p == pytest.approx(1 / 11)
    assert beyond_random(1.0, [0.0, 0.5]).test == "rank"  # too few for a t
    with pytest.raises(ValueError, match="unknown beyond-random test"):
        beyond_random(1.0, pool, "z")


def test_floors_the_report_words():
    # monotonicity: exact two-sided Spearman over every ordering of n strengths
    assert monotone_floor(4) == pytest.approx(2 / 24)
    assert monotone_floor(5) == pytest.approx(2 / 120)
    rho, p = monotonicity([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])
    assert rho == pytest.approx(1.0) and p == pytest.approx(monotone_floor(4))
    # ranking: 3 scoring questions and 8 recipes (28 pairs) can never separate a pair
    assert rank_floor(3, 28) == 1.0 and rank_floor(3, 1) == pytest.approx(0.25)
    assert questions_to_separate(28, 0.05) == 12 and questions_to_separate(21, 0.05) == 11
    # the floor is what separated_ranks reaches: all 4 questions one way, one pair
    kl = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 3.0, 5.0, 6.0])]
    from tlpersona.analyses.stats import paired_permutation

    assert paired_permutation(kl[0][None] - kl[1][None])[0] == pytest.approx(rank_floor(4, 1))


# ------------------------------------------------------------------------------------------
# the verdict, the report and answer() on a planted result


def _arm(mean: float) -> Arm:
    return Arm(Estimate(mean, mean - 0.1, mean + 0.1, 3), Estimate(0.1, 0.0, 0.2, 3), 0.1, 9)


def _score(recipe: str, own: float, pool: list[float], spec: tuple[float, float, float] | None,
           fluency: float = 0.0, strength: float = 0.125) -> RecipeScore:
    test = beyond_random(own, pool)
    return RecipeScore(
        operator="add", recipe=recipe, setting=Setting("add", (15,), strength),
        selection_effect=own, interior=True, fluency_ok=fluency >= -0.5, own=_arm(own),
        random=_arm(float(np.mean(pool))), random_effects=list(pool), other=_arm(own - 0.3),
        specificity=None if spec is None else Estimate(*spec, 3),
        fluency=Estimate(fluency, fluency - 0.1, fluency + 0.1, 3), random_p=test.rank_p,
        random_test=test.test, random_test_p=test.p, random_t_p=test.t_p, random_skew=test.skew,
        curve=[CurvePoint(a, own * a, a) for a in (0.03125, 0.0625, 0.125, 0.25)],
        monotone_rho=1.0, monotone_p=monotone_floor(4))


def _result(scores: list[RecipeScore], **cfg) -> S.SteeringResult:
    config = S.SteerConfig(operators=["add"], **cfg)
    for x, p in zip(scores, holm([x.random_test_p for x in scores]), strict=True):
        x.random_p_holm = float(p)
        x.beats_random = bool(p < 0.05 and x.fluency_ok)
        x.rank = 1
    verdict = _verdict("add", scores, config.n_random, len(scores), 0.05, config.random_test)
    return S.SteeringResult(
        config=config, store_manifest_hash="h", model="m", base="assistant",
        personas=PersonaChoice(["a", "b", "c"], "", {}), selection_questions=["q1", "q2"],
        scoring_questions=["q3", "q4", "q5"], questions_note="", layers=[15],
        recipes=[x.recipe for x in scores], typical_norm={15: 10.0}, scores=scores,
        verdicts={"add": verdict})


def _default_like() -> S.SteeringResult:
    weak = [f"r{i}" for i in range(5)]
    return _result([_score("last", DEFAULT_OWN, DEFAULT_POOL, (0.32, 0.27, 0.38)),
                    _score("response_mean", 0.401, DEFAULT_POOL, (0.2, 0.1, 0.3)),
                    *[_score(r, 0.0, DEFAULT_POOL, (0.0, -0.1, 0.1)) for r in weak],
                    _score("raw_system_last", 0.05, DEFAULT_POOL, None)])


def test_answer_names_the_called_recipe_with_its_numbers():
    res = _default_like()
    text = res.answer()
    assert len(text) <= ANSWER_CHARS and text.count(". ") == 0 and text.endswith(".")
    last = res.scores[0]
    want_holm = FAMILY * stats.ttest_ind([DEFAULT_OWN], DEFAULT_POOL, alternative="greater").pvalue
    assert last.random_p_holm == pytest.approx(want_holm)
    assert text.startswith("add: last (L15 alpha 0.125) steers to the persona beyond 10 random")
    assert f"Holm p {want_holm:.2g}" in text and "own 0.52 vs mean -0.13" in text
    assert "other personas' vectors by +0.32 [0.27, 0.38]" in text
    assert text.endswith("; also response_mean, not separated.")
    # too many names to fit: counted instead
    many = _default_like()
    for x in many.scores[2:5]:
        x.beats_random = True
    text = many.answer()
    assert len(text) <= ANSWER_CHARS and text.endswith("; also 4 more recipes, not separated.")


def test_answer_when_nothing_is_called_says_what_would_change():
    pool = list(DEFAULT_POOL)
    res = _result([_score("last", 0.1, pool, None), _score("sys_end", 0.05, pool, None)])
    text = res.answer()
    assert len(text) <= ANSWER_CHARS and "no recipe's vector is called" in text
    need = t_prediction_needed(pool, 0.05 / 2)
    # independent: the own effect at which scipy's t-test p equals the Holm threshold
    assert stats.ttest_ind([need], pool, alternative="greater").pvalue == pytest.approx(0.025)
    assert f"own ≥ {need:.2f}" in text and "≥ 40 random directions" in text
    # too few directions for any test: the exact rank test's need is named
    two = _result([_score("last", 0.9, [0.0, 0.1], None)], n_random=2)
    assert "needs ≥ 20 random directions" in two.answer()
    # called, but the setting breaks the text: the answer says so rather than naming it
    broken = _result([_score("last", DEFAULT_OWN, pool, (0.3, 0.2, 0.4), fluency=-0.9)])
    assert "fails the fluency guard (-0.90" in broken.answer()


def test_verdict_and_report_word_the_floors(tmp_path):
    from tlpersona.report.steering import write_steering

    res = _default_like()
    v = res.verdicts["add"]
    assert "last (L15 alpha 0.125), response_mean (L15 alpha 0.125) beyond the random" in v
    assert "t-prediction" in v and "normal" in v
    assert "cannot be separated" in v and "no recipe is separated" not in v
    assert "at least 12 scoring questions" in v
    md = write_steering(res, tmp_path).markdown
    assert "cannot fall below 0.083" in md and "cannot show monotonicity" in md
    assert "t-prediction" in md and "skewness" in md
    assert "-0.132 ± 0.137 (-0.374 to 0.063; skew -0.58)" in md
    assert (tmp_path / "figures" / "steering_effects.png").stat().st_size > 1000
    # a right-skewed pool: the verdict says the rank p decided and why
    skew = _result([_score("last", 3.0, [0.0, 0.1, 0.2, 0.3, 2.0, 0.05, 0.1, 0.0, 0.15, 0.1], None)])
    assert "right-skewed" in skew.verdicts["add"] and "cannot fall below 0.091" in skew.verdicts["add"]
