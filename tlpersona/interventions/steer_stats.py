"""Bootstrap over questions for steering effects, and rankings that only separate what a
sign-flip test over questions, Holm-adjusted over the pairs, separates.

Examples are (target persona, question) pairs; questions are the resampled unit, so every
persona's example on a drawn question comes along with it. All effects of one result share the
same question draws, which makes differences (own - other personas' vectors) paired.
Random-direction controls are resampled over directions as well as questions, so their interval
carries the spread between directions, not only the sampling noise of their mean.
(``scipy.stats.bootstrap`` resamples observations independently per call and offers neither
the shared draws nor the second level, hence the multinomial weights here.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
