"""Permutation tests, vectorised over permutations.

Mantel test: the persona labels of one matrix are permuted (rows and columns together) and the
correlation of the upper triangles recomputed; one-sided p = (1 + #{r_perm >= r_obs}) / (N + 1),
so the smallest attainable p is 1 / (N + 1).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


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
        # Entry (i, j) of the permuted matrix is m[p[i], p[j]]: flat indices into m.
        self.flat = (perms[:, self.iu[0]] * n + perms[:, self.iu[1]]).astype(np.intp)

    def triangle(self, m: np.ndarray, rank: bool = False) -> np.ndarray:
        v = m[self.iu].astype(np.float64)
        return stats.rankdata(v) if rank else v

    def many(self, xs: list[np.ndarray], y: np.ndarray, permuted_y: np.ndarray,
             rank: bool = False) -> list[tuple[float, float]]:
        """Mantel tests of several matrices against one ``y``: one matrix product for all."""
        yv = _standardise(self.triangle(y, rank))
        xv = np.stack([_standardise(self.triangle(x, rank)) for x in xs])  # [k, m]
        r_obs = xv @ yv
        r_perm = permuted_y @ xv.T.astype(np.float32)  # [N, k]
        # float32 products: count ties with the observed value as "as large" (conservative).
        counts = np.sum(r_perm >= (r_obs - 1e-6)[None, :], axis=0)
        return [(float(r), (1 + int(c)) / (self.n_perm + 1)) for r, c in zip(r_obs, counts, strict=True)]

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
    return perm.many([x], y, permuted_y, rank)[0]


def paired_permutation(d: np.ndarray, n_perm: int = 1000, seed: int = 0) -> np.ndarray:
    """Two-sided sign-flip test that the mean of each row of ``d`` (``[tests, n]``) is zero.

    ``d`` holds per-persona differences (e.g. cos(X,Y) - cos(X,Z)); flipping signs per persona
    is the permutation of the pair labels within each persona. Returns ``[tests]`` p-values.
    """
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, d.shape[1]))
    obs = np.abs(d.mean(axis=1))  # [tests]
    null = np.abs(d @ signs.T) / d.shape[1]  # [tests, N]
    return (1 + np.sum(null >= obs[:, None] - 1e-12, axis=1)) / (n_perm + 1)
