"""Agreement metrics between two recipes' persona vectors (numpy, float64).

Shapes: centroids ``[persona, d]`` (one layer); per-question vectors ``[persona, question, d]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


def mean_centre(x: np.ndarray) -> np.ndarray:
    """Subtract the mean over personas (axis 0): removes the recipe's shared offset."""
    return x - x.mean(axis=0, keepdims=True)


def rowwise_cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[n]`` cosine between matching rows of ``x`` and ``y`` (``[n, d]``)."""
    return np.sum(unit(x) * unit(y), axis=-1)


def cos_matrix(x: np.ndarray) -> np.ndarray:
    """``[n, n]`` inter-persona cosine matrix."""
    u = unit(x)
    return u @ u.T


def upper(m: np.ndarray) -> np.ndarray:
    """Upper triangle above the diagonal (k=1), row-major."""
    return m[np.triu_indices(m.shape[0], k=1)]


@dataclass
class Summary:
    mean: float
    min: float
    p5: float
    max: float

    @classmethod
    def of(cls, v: np.ndarray) -> Summary:
        return cls(float(v.mean()), float(v.min()), float(np.percentile(v, 5)), float(v.max()))


def matrix_agreement(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman between the upper triangles of two cosine matrices."""
    a, b = upper(cos_matrix(x)), upper(cos_matrix(y))
    return {"pearson": float(stats.pearsonr(a, b)[0]), "spearman": float(stats.spearmanr(a, b)[0])}


def thin_procrustes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthogonal map from ``a``'s row space to ``b``'s minimising ``||a R - b||`` (``[k, d]`` each).

    Returns factors ``(qa, m, qb)`` with ``R = qa @ m @ qb.T``; the d×d matrix is never formed.
    Directions outside the fitted rows' span map to zero (a conservative choice for held-out
    evaluation: it can only lower the held-out cosine).
    """
    qa, ra = np.linalg.qr(a.T)  # a.T = qa ra, [d, k]
    qb, rb = np.linalg.qr(b.T)
    u, _, vt = np.linalg.svd(ra @ rb.T)
    return qa, u @ vt, qb


def procrustes_cos(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-persona cosine on held-out personas after aligning mean-centred ``x`` onto ``y``.

    The map is fitted on a random half of the personas and applied to the other half, both ways
    round, so every persona is scored once by a map that never saw it. ``[n]``.
    """
    xc, yc = mean_centre(x), mean_centre(y)
    n = x.shape[0]
    perm = rng.permutation(n)
    halves = (perm[: n // 2], perm[n // 2:])
    out = np.empty(n)
    for fit, test in (halves, halves[::-1]):
        qa, m, qb = thin_procrustes(xc[fit], yc[fit])
        mapped = ((xc[test] @ qa) @ m) @ qb.T
        out[test] = rowwise_cos(mapped, yc[test])
    return out


def spread(per_q: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-question persona-discrimination spread ``[question]``.

    For each question, the personas' unit vectors' mean squared distance from their mean,
    which for unit vectors is ``1 - ||mean||²``. ``per_q``: ``[persona, question, d]``;
    ``valid``: ``[persona, question]`` bool. A question with fewer than 2 valid personas is NaN.
    """
    # float32 keeps a 275 × 240 × 3584 layer under 1 GB; the sum is taken in float64.
    u = unit(per_q.astype(np.float32)) * valid[..., None]
    cnt = valid.sum(axis=0).astype(np.float64)
    mean = u.sum(axis=0, dtype=np.float64) / np.maximum(cnt, 1)[:, None]
    out = 1.0 - np.sum(mean * mean, axis=-1)
    out[cnt < 2] = np.nan
    return out
