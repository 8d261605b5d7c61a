"""Permutation tests, vectorised over permutations.

Mantel test: the persona labels of one matrix are permuted (rows and columns together) and the
correlation of the upper triangles recomputed; one-sided p = (1 + #{r_perm >= r_obs}) / (N + 1),
so the smallest attainable p is 1 / (N + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class MantelResult:
    """Observed correlation, one-sided p, and the permutation null's mean, standard deviation
    and 95th percentile."""

    r: float
    p: float
    null_mean: float
    null_sd: float
    null_p95: float


def z_score(obs: float, null_mean: float, null_sd: float) -> float | None:
    """Distance of ``obs`` above a null in null standard deviations: a descriptive effect size.
    Not turned into a p-value: permutation nulls far out in their tails are heavier than a
    normal, so a normal tail would overstate significance. None when the null has no spread."""
    return float((obs - null_mean) / null_sd) if null_sd > 0 else None


def _standardise(v: np.ndarray) -> np.ndarray:
    """Rows (last axis) to zero mean and unit sum of squares, so a dot product is Pearson's r.

    In place when ``v`` is already a float array (the permuted triangles are large).
    """
    v = v if v.dtype.kind == "f" else v.astype(np.float64)
    v -= v.mean(axis=-1, keepdims=True)
    v /= np.sqrt(np.einsum("...i,...i->...", v, v))[..., None]
    return v


class MantelPermuter:
    """Shared permutations for many Mantel tests on ``n × n`` symmetric matrices.

    ``permuted(m)`` returns ``[N, m_pairs]`` standardised upper triangles of ``m`` under every
    permutation; a test of any other matrix against ``m`` is then one matrix-vector product.
    Computing it once per matrix (not per pair) is what keeps many pairs cheap.
    """

    def __init__(self, n: int, n_perm: int, seed: int):
        rng = np.random.default_rng(seed)
        self.n_perm = n_perm
        self.iu = np.triu_indices(n, k=1)
        perms = np.stack([rng.permutation(n) for _ in range(n_perm)])  # [N, n]
        self.perms = perms
        # Entry (i, j) of the permuted matrix is m[p[i], p[j]]: flat indices into m. int32 halves
        # the index's memory (n² < 2³¹ for any persona count a store holds).
        p32 = perms.astype(np.int32)
        self.flat = p32[:, self.iu[0]] * np.int32(n) + p32[:, self.iu[1]]

    def triangle(self, m: np.ndarray, rank: bool = False) -> np.ndarray:
        v = m[self.iu].astype(np.float64)
        return stats.rankdata(v) if rank else v

    def many(self, xs: list[np.ndarray], y: np.ndarray, permuted_y: np.ndarray,
             rank: bool = False) -> list[MantelResult]:
        """Mantel tests of several matrices against one ``y``: one matrix product for all."""
        yv = _standardise(self.triangle(y, rank))
        xv = np.stack([_standardise(self.triangle(x, rank)) for x in xs])  # [k, m]
        r_obs = xv @ yv
        r_perm = permuted_y @ xv.T.astype(np.float32)  # [N, k]
        # float32 products: count ties with the observed value as "as large" (conservative).
        counts = np.sum(r_perm >= (r_obs - 1e-6)[None, :], axis=0)
        means, sds = r_perm.mean(axis=0), r_perm.std(axis=0)
        p95 = np.percentile(r_perm, 95, axis=0)
        return [MantelResult(float(r), (1 + int(c)) / (self.n_perm + 1), float(m), float(sd), float(q))
                for r, c, m, sd, q in zip(r_obs, counts, means, sds, p95, strict=True)]

    def tests(self, xs: list[np.ndarray], y: np.ndarray, rank: bool = False
              ) -> list[MantelResult | None]:
        """Mantel tests of each of ``xs`` against ``y`` (all ``[n, n]``), as :meth:`many`;
        None for a pair where either matrix's upper triangle is constant (every persona alike,
        :func:`varies`). There r is undefined, and a NaN r is exceeded by no permuted r, which
        would give the smallest p the draws allow: a pair with no geometry would look beyond
        chance."""
        out: list[MantelResult | None] = [None] * len(xs)
        if not varies(self.triangle(y)):
            return out
        keep = [i for i, x in enumerate(xs) if varies(self.triangle(x))]
        if keep:
            got = self.many([xs[i] for i in keep], y, self.permuted(y, rank), rank)
            for i, res in zip(keep, got, strict=True):
                out[i] = res
        return out

    def permuted(self, m: np.ndarray, rank: bool = False) -> np.ndarray:
        full = np.zeros_like(m, dtype=np.float32)
        full[self.iu] = self.triangle(m, rank)
        full = full + full.T  # the permutation maps upper-triangle entries to either side
        return _standardise(full.ravel()[self.flat])


def varies(v: np.ndarray) -> bool:
    """Whether the entries of ``v`` (a matrix's upper triangle ``[pairs]``) are not all equal:
    a correlation with a constant, and so a Mantel test of it, is undefined. Tested by
    equality, not by a zero standard deviation: the mean of equal floats can miss them by a
    rounding step, which leaves a standard deviation of about 1e-17."""
    return bool(np.any(v != v.flat[0])) if v.size else False


def mantel(x: np.ndarray, y: np.ndarray, n_perm: int = 1000, seed: int = 0,
           method: str = "pearson") -> tuple[float, float]:
    """One Mantel test of ``x`` against ``y`` (``n × n``): (r, p)."""
    perm = MantelPermuter(x.shape[0], n_perm, seed)
    rank = method == "spearman"
    return mantel_with(perm, x, y, perm.permuted(y, rank), rank)


def mantel_with(perm: MantelPermuter, x: np.ndarray, y: np.ndarray, permuted_y: np.ndarray,
                rank: bool = False) -> tuple[float, float]:
    """Mantel test reusing ``permuted_y = perm.permuted(y, rank)``: (observed r, one-sided p)."""
    res = perm.many([x], y, permuted_y, rank)[0]
    return res.r, res.p


def paired_permutation(d: np.ndarray, n_perm: int = 1000, seed: int = 0) -> np.ndarray:
    """Two-sided sign-flip test that the mean of each row of ``d`` (``[tests, n]``) is zero.

    ``d`` holds per-persona differences (e.g. cos(X,Y) - cos(X,Z)); flipping signs per persona
    is the permutation of the pair labels within each persona. The statistic is ``|mean|``.
    Where ``2**n <= n_perm`` every sign pattern is enumerated (exact p, scipy's rule); otherwise
    ``n_perm`` seeded random patterns, p = (1 + #null >= observed) / (n_perm + 1).
    Returns ``[tests]`` p-values.
    """
    if d.shape[0] == 0 or d.shape[1] == 0:
        return np.empty(0)

    def stat(x: np.ndarray, axis: int) -> np.ndarray:
        return np.abs(np.mean(x, axis=axis))

    res = stats.permutation_test((d,), stat, permutation_type="samples", vectorized=True,
                                 n_resamples=n_perm, alternative="greater", axis=1,
                                 random_state=np.random.default_rng(seed))
    return np.atleast_1d(res.pvalue)


#: Bentkus & Dzindzalieta (2015, Bernoulli 21(2)): for a Rademacher sum S = Σ a_i ε_i with
#: Σ a_i² ≤ 1, P(S ≥ x) ≤ c · P(Z ≥ x) for a standard normal Z, with c = 1 / (4 P(Z ≥ √2)).
BENTKUS_C = float(1.0 / (4.0 * stats.norm.sf(np.sqrt(2.0))))
#: Largest n whose sign-flip distribution is counted exactly (two halves of at most 2^17 sums each).
EXACT_SIGN_FLIP_MAX = 34


def sign_flip_p(d: np.ndarray) -> np.ndarray:
    """Two-sided sign-flip p that each row's mean of ``d`` (``[tests, n]``) is zero, with no
    random draws: exact for n ≤ :data:`EXACT_SIGN_FLIP_MAX` (every one of the 2^n sign patterns
    counted, by meeting in the middle: the sums of each half's 2^(n/2) patterns, sorted), else
    the Bentkus–Dzindzalieta bound ``min(1, 2 c Φ(−|z|))`` with ``z = Σd / √Σd²``, valid for
    any n and any d. The exact p is what :func:`paired_permutation` gives when it enumerates
    (the identity pattern included, so p ≥ 2 / 2^n). Returns ``[tests]`` p-values."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] == 0:
        return np.ones(d.shape[0] if d.ndim == 2 else 0)
    n = d.shape[1]
    if n > EXACT_SIGN_FLIP_MAX:
        z = np.abs(sign_flip_z(d))
        return np.minimum(1.0, 2.0 * BENTKUS_C * stats.norm.sf(z))
    half = n // 2
    left, right = _sign_patterns(half), _sign_patterns(n - half)  # [2^h, h], [2^(n-h), n-h]
    out = np.empty(d.shape[0])
    for i, row in enumerate(d):
        t = abs(row.sum())
        # ties with the observed |sum| count as "as extreme" (float sums of the same terms)
        tol = 1e-9 * max(float(np.abs(row).sum()), 1e-300)
        lo = left @ row[:half]
        hi = np.sort(right @ row[half:])
        ge = hi.size - np.searchsorted(hi, t - tol - lo, side="left")  # l + r ≥ t
        le = np.searchsorted(hi, -t + tol - lo, side="right")  # l + r ≤ −t
        both = np.sum(ge + le) if t > tol else 2 ** n  # t ≈ 0: every pattern is as extreme
        out[i] = min(1.0, float(both) / 2 ** n)
    return out


def _sign_patterns(k: int) -> np.ndarray:
    """Every ±1 pattern of length ``k``: ``[2^k, k]``."""
    bits = (np.arange(2 ** k)[:, None] >> np.arange(k)[None, :]) & 1
    return (1 - 2 * bits).astype(np.float64)


def draws_for_family(m: int, alpha: float) -> int:
    """Draws a resampling test needs so that the smallest Holm-adjusted p over ``m`` tests,
    ``m / (N + 1)`` when every test sits at the floor 1 / (N + 1), is at most ``alpha / 2``:
    N = ⌈2m / α⌉, rounded up to a multiple of 100 and never below 1000. The factor 2 leaves
    room for tests whose observed value a few draws reach."""
    need = math.ceil(2 * m / alpha)
    return max(1000, -(-need // 100) * 100)


def holm(p: list[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values for one family of tests (controls the family-wise error
    rate under any dependence). NaN entries are left out of the family and stay NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def sign_flip_z(d: np.ndarray) -> np.ndarray:
    """Each row's mean (``d``: ``[tests, n]``) in units of its sign-flip null's standard
    deviation, which is ``sqrt(sum d²) / n`` exactly (descriptive; rows of zeros give 0)."""
    sd = np.sqrt(np.sum(d * d, axis=1)) / d.shape[1]
    return np.where(sd > 0, d.mean(axis=1) / np.where(sd > 0, sd, 1.0), 0.0)
