"""Permutation tests, vectorised over permutations.

Mantel test: the persona labels of one matrix are permuted (rows and columns together) and the
correlation of the upper triangles recomputed; one-sided p = (1 + #{r_perm >= r_obs}) / (N + 1),
so the smallest attainable p is 1 / (N + 1).
"""

from __future__ import annotations

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
        # Entry (i, j) of the permuted matrix is m[p[i], p[j]]: flat indices into m.
        self.flat = (perms[:, self.iu[0]] * n + perms[:, self.iu[1]]).astype(np.intp)

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

    def permuted(self, m: np.ndarray, rank: bool = False) -> np.ndarray:
        full = np.zeros_like(m, dtype=np.float32)
        full[self.iu] = self.triangle(m, rank)
        full = full + full.T  # the permutation maps upper-triangle entries to either side
        return _standardise(full.ravel()[self.flat])


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
