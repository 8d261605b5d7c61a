"""Bootstrap over questions for steering effects, and rankings that only separate what a
sign-flip test over questions, Holm-adjusted over the pairs, separates.

Examples are (target persona, question) pairs; questions are the resampled unit, so every
persona's example on a drawn question comes along with it. All effects of one result share the
same question draws, which makes differences (own - other personas' vectors) paired.
Random-direction controls are resampled over directions as well as questions, so their interval
carries the spread between directions, not only the sampling noise of their mean.
(``scipy.stats.bootstrap`` resamples observations independently per call and offers neither
the shared draws nor the second level, hence the multinomial weights here.)

"Beyond random" is a test, not an interval: :func:`beyond_random` compares the own effect
with the random directions' individual effects (a one-sided t-prediction where their shape
allows it, else their exact rank), since the interval of their mean says nothing about where
one more direction would land.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class Estimate:
    """A statistic with its percentile bootstrap interval; ``n``: questions it rests on."""

    mean: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, point: float, draws: np.ndarray, n: int, level: float) -> Estimate:
        tail = (1 - level) / 2 * 100
        finite = draws[np.isfinite(draws)]
        if not finite.size:
            return cls(point, float("nan"), float("nan"), n)
        lo, hi = np.percentile(finite, [tail, 100 - tail])
        return cls(float(point), float(lo), float(hi), n)


class Bootstrap:
    """Shared question draws: ``weights`` ``[B, n_questions]`` multinomial counts."""

    def __init__(self, n_questions: int, n_boot: int, seed: int, level: float = 0.95):
        self.rng = np.random.default_rng(seed)
        self.n = n_questions
        self.level = level
        draws = self.rng.integers(0, n_questions, size=(n_boot, n_questions))
        self.weights = np.stack([np.bincount(d, minlength=n_questions) for d in draws]).astype(float)

    def direction_weights(self, k: int) -> np.ndarray:
        """``[B, k]`` counts for resampling ``k`` random directions (drawn once per call)."""
        draws = self.rng.integers(0, k, size=(len(self.weights), k))
        return np.stack([np.bincount(d, minlength=k) for d in draws]).astype(float)

    def ratio_effect(self, kl: np.ndarray, kl0: np.ndarray,
                     dir_w: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """Effect ``1 - sum kl / sum kl0`` and its bootstrap draws ``[B]``.

        ``kl``/``kl0``: ``[..., question]`` per-example values (leading axes summed; with
        ``dir_w`` the first axis is the random direction and is resampled with it).
        """
        num_q, den_q = _per_question(kl, dir_w is not None), _per_question(kl0, dir_w is not None)
        point = 1 - num_q.sum() / den_q.sum()
        if dir_w is None:
            num, den = self.weights @ num_q, self.weights @ den_q
        else:
            num = np.einsum("bk,kq,bq->b", dir_w, num_q, self.weights)
            den = np.einsum("bk,kq,bq->b", dir_w, den_q, self.weights)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(point), 1 - num / den

    def mean(self, x: np.ndarray, dir_w: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """Mean over examples of ``x`` (``[..., question]``) and its draws ``[B]``."""
        s = _per_question(x, dir_w is not None)
        c = _per_question(np.ones_like(x), dir_w is not None)
        point = s.sum() / c.sum()
        if dir_w is None:
            return float(point), (self.weights @ s) / (self.weights @ c)
        num = np.einsum("bk,kq,bq->b", dir_w, s, self.weights)
        den = np.einsum("bk,kq,bq->b", dir_w, c, self.weights)
        return float(point), num / den

    def estimate(self, point: float, draws: np.ndarray) -> Estimate:
        return Estimate.of(point, draws, self.n, self.level)


def _per_question(x: np.ndarray, keep_first: bool) -> np.ndarray:
    """Sum every axis but the last (and the first, when it is the direction axis)."""
    if keep_first:
        return x.reshape(x.shape[0], -1, x.shape[-1]).sum(1)
    return x.reshape(-1, x.shape[-1]).sum(0)


def separated_ranks(kl: list[np.ndarray], level: float, seed: int = 0) -> list[int]:
    """Rank of each entry: 1 + the number of entries that beat it. ``kl``: per entry
    ``[question]`` edited KL summed over targets (the unedited KL, the effects' shared
    denominator, cancels). Entry j beats i where the per-question differences pass a two-sided
    sign-flip test over questions, Holm-adjusted over every pair, at ``1 - level``; the
    bootstrap intervals cannot serve here, being too narrow with few questions and uncorrected
    for the pairs. With n questions no p falls below 2 / 2**n: equal ranks are ties the data
    cannot break."""
    from tlpersona.analyses.stats import holm, paired_permutation

    pairs = [(i, j) for i in range(len(kl)) for j in range(i + 1, len(kl))]
    beaten = [0] * len(kl)
    if not pairs:
        return [1] * len(kl)
    d = np.array([kl[i] - kl[j] for i, j in pairs])  # > 0: j moved closer to the goal
    for (i, j), dij, p in zip(pairs, d, holm(paired_permutation(d, seed=seed)), strict=True):
        if p < 1 - level:
            beaten[i if dij.sum() > 0 else j] += 1
    return [1 + b for b in beaten]


#: Tests of "the own vector moves the model more than a random direction would".
RANDOM_TESTS = ("t", "rank")


@dataclass
class BeyondRandom:
    """The own effect against the ``k`` random directions' effects at the same setting.

    ``p``: the p the claim rests on — the t-prediction p where ``test == "t"``, else the rank
    p. ``rank_p``: (1 + #random ≥ own) / (k + 1), exact for a direction exchangeable with the
    random ones, never below 1 / (k + 1). ``t_p``: one-sided t-prediction p (NaN where the
    pool has fewer than 3 directions or no spread). ``skew``: the pool's sample skewness
    (adjusted Fisher–Pearson; NaN below 3 directions). ``shape_ok``: the pool passed the
    shape check the t-prediction needs."""

    p: float
    test: str
    rank_p: float
    t_p: float
    skew: float
    shape_ok: bool


def rank_p(own: float, random: list[float] | np.ndarray) -> float:
    """Rank p of ``own`` among the random directions' effects: (1 + #random ≥ own) / (N + 1)."""
    r = np.asarray(random, dtype=float)
    return float((1 + np.sum(r >= own)) / (r.size + 1))


def t_prediction_p(own: float, random: list[float] | np.ndarray) -> float:
    """One-sided p that a new draw from the random directions' law reaches ``own``:
    ``1 - T_{k-1}((own - mean) / (sd · sqrt(1 + 1/k)))`` over the ``k`` random effects. Exact
    when the random effects are normal (the prediction interval of a normal sample); one-sided
    because the claim is only that the own vector moves the model further toward the goal."""
    r = np.asarray(random, dtype=float)
    k = r.size
    sd = float(r.std(ddof=1)) if k > 1 else 0.0
    if k < 3 or not sd > 0:
        return float("nan")
    z = (own - float(r.mean())) / (sd * np.sqrt(1 + 1 / k))
    return float(stats.t.sf(z, k - 1))


def pool_skew(random: list[float] | np.ndarray) -> float:
    r = np.asarray(random, dtype=float)
    if r.size < 3 or not np.ptp(r) > 0:
        return float("nan")
    return float(stats.skew(r, bias=False))


def beyond_random(own: float, random: list[float] | np.ndarray, test: str = "t") -> BeyondRandom:
    """The test behind "beyond random" (see :class:`BeyondRandom`).

    ``test="t"``: the t-prediction p, used where the pool's sample skewness is ≤ 0, i.e. its
    upper tail — the side the own effect is compared with — is no longer than its lower one.
    On planted pools of 10 (tests/unit/test_steer_null.py; ``benchmarks/steer_null_calibration.py
    --planted``) the t-prediction is exact for normal pools and conservative for left-skewed
    ones — the embedded model's are: a random push of fixed norm can hurt much more than it
    helps. On right-skewed pools (skewness +0.8 to +1) it is 1.5× too liberal at 0.05 and 3–5×
    at the Holm thresholds 0.05/8–0.05/21; the check brings those to 0.4× at 0.05, 0.9–1.2× at
    0.05/8 and 1.2–1.7× at 0.05/21. It does not catch symmetric heavy tails (t with 3 degrees
    of freedom: 1.5× at 0.05/8), and it costs power: a normal pool passes it half the time, one
    skewed like the model's (about −0.4) 64 % of the time.
    Where it fails the rank p decides (exact, but with 10 directions never below 1/11), and
    the verdict says so. ``test="rank"``: the rank p always, exact under exchangeability of
    the own vector with the random directions (needs at least tests / α directions to survive
    Holm)."""
    if test not in RANDOM_TESTS:
        raise ValueError(f"unknown beyond-random test {test!r} ({', '.join(RANDOM_TESTS)})")
    rp, tp, g = rank_p(own, random), t_prediction_p(own, random), pool_skew(random)
    shape_ok = bool(np.isfinite(tp) and np.isfinite(g) and g <= 0)
    if test == "t" and shape_ok:
        return BeyondRandom(tp, "t", rp, tp, g, True)
    return BeyondRandom(rp, "rank", rp, tp, g, shape_ok)


def t_prediction_needed(random: list[float] | np.ndarray, p: float) -> float:
    """The own effect at which the t-prediction p over ``random`` equals ``p``."""
    r = np.asarray(random, dtype=float)
    k = r.size
    return float(r.mean() + r.std(ddof=1) * np.sqrt(1 + 1 / k) * stats.t.isf(p, k - 1))
