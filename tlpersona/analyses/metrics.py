"""Agreement metrics between two recipes' persona vectors (numpy, float64).

Shapes: centroids ``[persona, d]`` (one layer); per-question vectors ``[persona, question, d]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
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
    return _procrustes_from_qr(np.linalg.qr(a.T), np.linalg.qr(b.T))


def _procrustes_from_qr(fa: tuple[np.ndarray, np.ndarray], fb: tuple[np.ndarray, np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    (qa, ra), (qb, rb) = fa, fb  # a.T = qa ra, b.T = qb rb
    u, _, vt = np.linalg.svd(ra @ rb.T)
    return qa, u @ vt, qb


class HeldOutProcrustes:
    """Held-out Procrustes cosines for many recipe pairs on one persona split.

    The map is fitted on one random half of the personas and applied to the other, both ways
    round, so every persona is scored once by a map that never saw it. Every pair uses the same
    halves, so each recipe's QR factors (the costly part at d = 3584) are computed once.
    """

    def __init__(self, n: int, rng: np.random.Generator):
        perm = rng.permutation(n)
        self.halves = (perm[: n // 2], perm[n // 2:])
        self._qr: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def _factor(self, key: str, xc: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray]:
        if (key, h) not in self._qr:
            self._qr[(key, h)] = np.linalg.qr(xc[self.halves[h]].T)
        return self._qr[(key, h)]

    def cos(self, kx: str, xc: np.ndarray, ky: str, yc: np.ndarray) -> np.ndarray:
        """``[n]`` cosines of mean-centred ``xc`` mapped onto mean-centred ``yc``."""
        out = np.empty(xc.shape[0])
        for h in (0, 1):
            qa, m, qb = _procrustes_from_qr(self._factor(kx, xc, h), self._factor(ky, yc, h))
            test = self.halves[1 - h]
            out[test] = rowwise_cos(((xc[test] @ qa) @ m) @ qb.T, yc[test])
        return out


def procrustes_cos(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-persona held-out cosine after aligning mean-centred ``x`` onto ``y`` (``[n]``)."""
    return HeldOutProcrustes(x.shape[0], rng).cos("x", mean_centre(x), "y", mean_centre(y))


def spread_sums(per_q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[question, d]`` float64 sum over valid personas of unit vectors (chunkable over personas)."""
    v = per_q.float()
    norms = torch.einsum("pqd,pqd->pq", v, v).sqrt()
    w = torch.where(valid.bool() & (norms > 0), 1.0 / norms.clamp(min=1e-30), torch.zeros_like(norms))
    return torch.einsum("pq,pqd->qd", w, v).double()


def spread_finish(sums: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
    """Spread per question from :func:`spread_sums` and valid-persona counts ``[question]``."""
    cnt = counts.double()
    mean = sums / cnt.clamp(min=1)[:, None]
    out = (1.0 - (mean * mean).sum(-1)).numpy()
    out[cnt.numpy() < 2] = np.nan
    return out


def spread(per_q: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-question persona-discrimination spread ``[question]``.

    For each question, the personas' unit vectors' mean squared distance from their mean,
    which for unit vectors is ``1 - ||mean||²``. ``per_q``: ``[persona, question, d]``;
    ``valid``: ``[persona, question]`` bool. A question with fewer than 2 valid personas is NaN.
    Computed as weighted sums, so no normalised copy of ``per_q`` is made.
    """
    ok = torch.as_tensor(valid).bool()
    return spread_finish(spread_sums(torch.as_tensor(per_q), ok), ok.sum(0))
