"""Agreement metrics between two recipes' persona vectors (numpy, float64).

Shapes: centroids ``[persona, d]`` (one layer); per-question vectors ``[persona, question, d]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from scipy.linalg import orthogonal_procrustes
from threadpoolctl import threadpool_limits

from tlpersona.infra.resultjson import OMIT_NONE, to_json


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


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two vectors (NaN when either is constant); numpy alone, for loops that
    compute it thousands of times (scipy's ``pearsonr`` checks its input at every call)."""
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def matrix_agreement(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman between the upper triangles of two cosine matrices."""
    a, b = upper(cos_matrix(x)), upper(cos_matrix(y))
    return {"pearson": float(stats.pearsonr(a, b)[0]), "spearman": float(stats.spearmanr(a, b)[0])}


#: Most principal directions a held-out rotation is fitted in. Persona geometry lives in the top
#: directions; the cap keeps the thousands of rotations behind the null cheap at 275 personas.
MAX_RANK = 32

#: Persona halvings a held-out Procrustes cosine (its null and its ceiling too) averages over.
PROCRUSTES_SPLITS = 4

#: Fewest personas in a fit half for a held-out rotation to mean anything: a rotation fitted on
#: 3 centred points lives in 2 dimensions, where any two configurations nearly align.
MIN_FIT_PERSONAS = 4


@dataclass
class _Fit:
    """One recipe fitted on a fit half: coordinates of the fit rows and of the test rows in the
    fit half's top principal directions, after centring with the fit half's mean."""

    fit: np.ndarray  # [n_fit, r], r <= min(n_fit - 1, MAX_RANK)
    test: np.ndarray  # [n_test, r]


def _fit_half(gram: np.ndarray, fit: np.ndarray, test: np.ndarray) -> _Fit:
    """:class:`_Fit` from the recipe's Gram matrix ``[n, n]`` (``x @ x.T``): the fit half's
    centred Gram matrix gives its principal coordinates, and the test rows' inner products with
    the fit rows give theirs. Equal to an SVD of the centred fit rows, at the size of the
    persona count instead of d_model."""
    m = len(fit)
    gff = gram[np.ix_(fit, fit)]
    col = gff.mean(axis=0)
    gc = gff - col[None, :] - col[:, None] + col.mean()
    lam, u = np.linalg.eigh(gc)
    lam, u = lam[::-1], u[:, ::-1]
    keep = int(np.sum(lam > max(lam[0], 0.0) * 1e-12)) if m else 0
    r = min(keep, MAX_RANK, m - 1)
    lam, u = lam[:r], u[:, :r]
    # (x_test - mean_fit) @ (centred x_fit).T = G_tf - mean over fit of G_f·, centred over fit
    gtf = gram[np.ix_(test, fit)] - col[None, :]
    gtf = gtf - gtf.mean(axis=1, keepdims=True)
    return _Fit(u * np.sqrt(lam), (gtf @ u) / np.sqrt(lam))


def _rotated_cos(fx: _Fit, fy: _Fit, ty: np.ndarray | None = None) -> np.ndarray:
    """``[n_test]`` cosines of ``x``'s test rows rotated onto ``y``'s by the orthogonal map fitted
    on the fit rows, in the smaller of the two ranks."""
    r = min(fx.fit.shape[1], fy.fit.shape[1])
    rot, _ = orthogonal_procrustes(fx.fit[:, :r], fy.fit[:, :r])
    return rowwise_cos(fx.test[:, :r] @ rot, fy.test[:, :r])


@dataclass
class ProcrustesScore:
    """Held-out Procrustes cosine of one recipe pair, with its null and ceiling.

    ``per_persona`` is each persona's cosine averaged over the splits (every persona is scored
    once per split, by a rotation fitted on the other half). ``null_means`` come from the same
    procedure after shuffling one recipe's persona labels. ``p`` is one-sided: (1 + #null means
    >= observed) / (N + 1). ``ceiling`` (set by the caller) is what the same procedure gives
    between two question halves of one recipe.
    """

    per_persona: np.ndarray | None  # [n]
    null_means: np.ndarray | None  # [n_null]
    n_fit: int
    rank: int
    n_splits: int
    reason: str | None = None
    ceiling: float | None = None

    def held_out(self, ceiling: float | None) -> HeldOutCos | HeldOutSkipped:
        """The typed statistics, beside ``ceiling`` (what two question halves of one recipe
        reach, from the caller)."""
        if self.per_persona is None or self.null_means is None:
            return HeldOutSkipped(reason=str(self.reason), n_fit=self.n_fit, ceiling=ceiling)
        from tlpersona.analyses.stats import z_score

        s = Summary.of(self.per_persona)
        null = self.null_means
        return HeldOutCos(
            mean=s.mean, min=s.min, p5=s.p5, max=s.max,
            null_mean=float(null.mean()),
            null_sd=float(null.std()),
            null_p95=float(np.percentile(null, 95)),
            null_n=int(null.size),
            p=float((1 + np.sum(null >= s.mean - 1e-12)) / (null.size + 1)),
            z=z_score(s.mean, float(null.mean()), float(null.std())),
            ceiling=ceiling, n_fit=self.n_fit, rank=self.rank, n_splits=self.n_splits)

    def to_dict(self) -> dict[str, object]:
        if self.per_persona is None or self.null_means is None:
            return {"mean": None, "min": None, "p5": None, "max": None, "reason": self.reason,
                    "n_fit": self.n_fit}
        out = to_json(self.held_out(self.ceiling))
        assert isinstance(out, dict)
        return out


@dataclass(frozen=True, kw_only=True)
class HeldOutCos:
    """A pair's held-out Procrustes cosine (per persona: mean, min, 5th percentile, max) beside
    its relabelled null, its ceiling and its split; ``p_holm`` (Holm over the run's cells) only
    where the run's draws can reach alpha after Holm."""

    mean: float
    min: float
    p5: float
    max: float
    null_mean: float
    null_sd: float
    null_p95: float
    null_n: int
    p: float  # one-sided: (1 + #null means >= observed) / (N + 1)
    z: float | None
    ceiling: float | None
    n_fit: int
    rank: int
    n_splits: int
    p_holm: float | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class HeldOutSkipped:
    """Why a pair has no held-out Procrustes cosine (too few personas), beside its ceiling."""

    mean: None = None
    min: None = None
    p5: None = None
    max: None = None
    reason: str
    n_fit: int
    ceiling: float | None


class HeldOutProcrustes:
    """Leak-free held-out Procrustes cosines for many recipe pairs on shared persona splits.

    Use: ``add`` each recipe's centroids, then ``score_pairs``; ``mean_score`` scores one pair
    without a null (the noise-floor ceiling).

    For each of ``n_splits`` seeded random halvings, a rotation is fitted on one half of the
    personas and scored on the other, both ways round. Nothing about the scored half enters the
    fit: the centring mean and the principal directions come from the fit half alone (centring
    over all personas would put the scored half's mean inside the fitted span).

    The null relabels one recipe's personas with a random permutation (the same one for every
    split) and reruns everything, so it is computed exactly as the observed value is. Each
    recipe's fits, observed and relabelled, are computed once and shared by all its pairs.
    """

    def __init__(self, n: int, n_splits: int, rng: np.random.Generator, n_null: int = 100):
        self.n = n
        self.n_fit = n // 2
        self.splits = []
        for _ in range(max(n_splits, 1)):
            perm = rng.permutation(n)
            self.splits.append((perm[: n // 2], perm[n // 2:]))
        self.null_perms = [rng.permutation(n) for _ in range(n_null)]
        self._gram: dict[str, np.ndarray] = {}

    @property
    def enough(self) -> bool:
        return self.n_fit >= MIN_FIT_PERSONAS

    def add(self, key: str, x: np.ndarray) -> None:
        """Register a recipe's centroids ``[n, d]`` (not centred: centring is per fit half)."""
        x = np.asarray(x, dtype=np.float64)
        self._gram[key] = x @ x.T

    def _fits(self, key: str, relabel: np.ndarray | None) -> list[tuple[_Fit, _Fit]]:
        """Per split, the fits on its first and on its second half (rows relabelled: persona i
        of the relabelled recipe is persona ``relabel[i]`` of the original)."""
        g = self._gram[key]
        out = []
        for a, b in self.splits:
            ra, rb = (a, b) if relabel is None else (relabel[a], relabel[b])
            out.append((_fit_half(g, ra, rb), _fit_half(g, rb, ra)))
        return out

    def _per_persona(self, fx: list[tuple[_Fit, _Fit]], fy: list[tuple[_Fit, _Fit]]) -> np.ndarray:
        total = np.zeros(self.n)
        for (a, b), (xa, xb), (ya, yb) in zip(self.splits, fx, fy, strict=True):
            total[b] += _rotated_cos(xa, ya)
            total[a] += _rotated_cos(xb, yb)
        return total / len(self.splits)

    def mean_score(self, kx: str, ky: str) -> float | None:
        """Mean held-out cosine of one pair, without its null (None with too few personas)."""
        if not self.enough:
            return None
        with threadpool_limits(limits=1, user_api="blas"):
            return float(self._per_persona(self._fits(kx, None), self._fits(ky, None)).mean())

    def score_pairs(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], ProcrustesScore]:
        """Scores of every ``(x, y)`` pair; the null relabels ``y``."""
        # thousands of persona-sized eigendecompositions: BLAS threads only cost here
        with threadpool_limits(limits=1, user_api="blas"):
            return self._score_pairs(pairs)

    def _score_pairs(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], ProcrustesScore]:
        if not self.enough:
            why = (f"too few personas: a held-out rotation needs at least {2 * MIN_FIT_PERSONAS}, "
                   f"got {self.n}")
            return {p: ProcrustesScore(None, None, self.n_fit, 0, len(self.splits), why)
                    for p in pairs}
        keys = sorted({k for p in pairs for k in p})
        fits = {k: self._fits(k, None) for k in keys}
        null = {p: np.empty(len(self.null_perms)) for p in pairs}
        for y in sorted({p[1] for p in pairs}):  # one relabelled fit per y and draw, all partners
            partners = [p for p in pairs if p[1] == y]
            for i, perm in enumerate(self.null_perms):
                fy = self._fits(y, perm)
                for p in partners:
                    null[p][i] = self._per_persona(fits[p[0]], fy).mean()
        out = {}
        for x, y in pairs:
            rank = min(fits[k][0][0].fit.shape[1] for k in (x, y))
            out[(x, y)] = ProcrustesScore(self._per_persona(fits[x], fits[y]), null[(x, y)],
                                          self.n_fit, rank, len(self.splits))
        return out


def procrustes_score(x: np.ndarray, y: np.ndarray, seed: int = 0, n_splits: int = PROCRUSTES_SPLITS,
                     n_null: int = 100) -> ProcrustesScore:
    """Held-out Procrustes cosine of ``y`` (``[n, d]``) from ``x``, with its null."""
    h = HeldOutProcrustes(x.shape[0], n_splits, np.random.default_rng(seed), n_null)
    h.add("x", x)
    h.add("y", y)
    return h.score_pairs([("x", "y")])[("x", "y")]


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


# --- CKA, for comparability with other tools (not part of any verdict) ---------------------

#: Permutations a CKA null gathers at a time: [256, n(n-1)/2] float64 is ~77 MB at 275 personas.
CKA_PERM_CHUNK = 256


def centred_gram(x: np.ndarray) -> np.ndarray:
    """``[n, n]`` linear Gram matrix of the rows of ``x`` (``[n, d]``) after mean-centring over
    personas, H X Xᵀ H: linear CKA is defined on centred features, and without centring a
    shared offset makes any two recipes look alike."""
    xc = mean_centre(np.asarray(x, dtype=np.float64))
    return xc @ xc.T


def hsic_unbiased(k: np.ndarray, g: np.ndarray) -> float:
    """Unbiased HSIC of two ``[n, n]`` Gram matrices (Song et al. 2012, eq. 5; n >= 4). Unlike
    the biased estimate it gives 0 in expectation for independent data, and it is unchanged by
    shifting either recipe's vectors (so it does not matter whether the Grams are centred)."""
    n = k.shape[0]
    kt, gt = _zero_diag(k), _zero_diag(g)
    return float(_hsic_u_terms(float(np.sum(kt * gt)), kt.sum(), gt.sum(),
                               float(kt.sum(0) @ gt.sum(0)), n))


def _zero_diag(k: np.ndarray) -> np.ndarray:
    out = np.array(k, dtype=np.float64)
    np.fill_diagonal(out, 0.0)
    return out


def _hsic_u_terms(trace: float | np.ndarray, sum_k: float, sum_l: float,
                  rows: float | np.ndarray, n: int) -> float | np.ndarray:
    """Song et al.'s unbiased HSIC from tr(K̃L̃), 1ᵀK̃1, 1ᵀL̃1 and 1ᵀK̃L̃1 (K̃: zero diagonal)."""
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows) / (n * (n - 3))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two recipes' centroids ``[n, d]`` (mean-centred over personas):
    ⟨K, L⟩_F / (‖K‖_F ‖L‖_F) of their centred Gram matrices. NaN where either is constant."""
    k, g = centred_gram(x), centred_gram(y)
    den = float(np.linalg.norm(k) * np.linalg.norm(g))
    return float(np.sum(k * g) / den) if den > 0 else float("nan")


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA (unbiased HSIC in numerator and denominator; Nguyen et al. 2021):
    near 0 for unrelated recipes where the biased form is not. NaN where either is constant."""
    k, g = centred_gram(x), centred_gram(y)
    den = hsic_unbiased(k, k) * hsic_unbiased(g, g)
    return hsic_unbiased(k, g) / float(np.sqrt(den)) if den > 0 else float("nan")


@dataclass(frozen=True)
class CkaStat:
    """One CKA value beside its permutation null (one recipe's persona labels shuffled).
    ``p`` is one-sided: (1 + #null >= observed) / (N + 1); None where the value is undefined."""

    value: float | None
    null_mean: float | None
    null_sd: float | None
    null_p95: float | None
    p: float | None

    @classmethod
    def of(cls, value: float, null: np.ndarray) -> CkaStat:
        if not np.isfinite(value):
            return cls(None, None, None, None, None)
        return cls(value, float(null.mean()), float(null.std()), float(np.percentile(null, 95)),
                   float((1 + np.sum(null >= value - 1e-9)) / (null.size + 1)))


@dataclass(frozen=True)
class CkaScore:
    linear: CkaStat
    debiased: CkaStat


def cka_scores(kxs: list[np.ndarray], ky: np.ndarray, perms: np.ndarray,
               flat: np.ndarray | None = None) -> list[CkaScore]:
    """Linear and debiased CKA of each centred Gram matrix in ``kxs`` against ``ky`` (all
    ``[n, n]``, from :func:`centred_gram`), each with the null of ``ky``'s persona labels
    permuted by every row of ``perms`` ``[N, n]``. ``flat``: the permuted upper triangle's
    flat indices ``[N, n(n-1)/2]`` (``MantelPermuter.flat``), computed here when not given.

    Both statistics are linear in the permuted Gram matrix's upper triangle, its diagonal and
    its row sums, so every partner's null is one matrix product per chunk of permutations, at
    the size of the persona count (never d_model)."""
    n = ky.shape[0]
    iu = np.triu_indices(n, k=1)
    ky_t = _zero_diag(ky)
    ly_diag, ly_rows = np.diag(ky), ky_t.sum(0)
    kx_t = [_zero_diag(k) for k in kxs]
    up = np.stack([k[iu] for k in kxs], axis=1)  # [m, k]
    diag = np.stack([np.diag(k) for k in kxs], axis=1)  # [n, k]
    rows = np.stack([k.sum(0) for k in kx_t], axis=1)  # [n, k]
    sums = np.array([k.sum() for k in kx_t])
    full = ky.ravel()
    cross, diag_dot, row_dot = [], [], []
    for start in range(0, len(perms), CKA_PERM_CHUNK):
        p = perms[start:start + CKA_PERM_CHUNK]
        idx = p[:, iu[0]] * n + p[:, iu[1]] if flat is None else flat[start:start + len(p)]
        cross.append(full[idx] @ up)  # Σ_{i<j} K_ij L_{p_i p_j}
        diag_dot.append(ly_diag[p] @ diag)
        row_dot.append(ly_rows[p] @ rows)
    c, dd, rd = (np.concatenate(v) for v in (cross, diag_dot, row_dot))  # each [N, k]
    norm_y = float(np.linalg.norm(ky))
    self_y = hsic_unbiased(ky, ky)
    out = []
    for j, kx in enumerate(kxs):
        den_lin = float(np.linalg.norm(kx)) * norm_y
        lin_null = (dd[:, j] + 2 * c[:, j]) / den_lin if den_lin > 0 else np.full(len(c), np.nan)
        den_deb = float(np.sqrt(max(hsic_unbiased(kx, kx) * self_y, 0.0)))
        deb_null = (_hsic_u_terms(2 * c[:, j], sums[j], ky_t.sum(), rd[:, j], n) / den_deb
                    if den_deb > 0 else np.full(len(c), np.nan))
        lin = float(np.sum(kx * ky)) / den_lin if den_lin > 0 else float("nan")
        deb = hsic_unbiased(kx, ky) / den_deb if den_deb > 0 else float("nan")
        out.append(CkaScore(CkaStat.of(lin, lin_null), CkaStat.of(deb, np.asarray(deb_null))))
    return out


@dataclass(frozen=True)
class SplitHalfCka:
    """One recipe's CKA between two question halves of its centroids, averaged over the
    splits: ``linear`` and ``debiased`` at half size, and ``hsic_cross`` (the mean unbiased
    HSIC between the halves), which estimates the noise-free ‖C‖² of the recipe's persona
    geometry whatever the half size, since the halves' noise is independent."""

    linear: float
    debiased: float
    hsic_cross: float


def split_half_cka(halves: np.ndarray) -> SplitHalfCka:
    """:class:`SplitHalfCka` from half centroids ``[persona, 2K, d]`` (halves 2k, 2k+1 pair)."""
    lin, deb, cross = [], [], []
    for k in range(halves.shape[1] // 2):
        a, b = halves[:, 2 * k], halves[:, 2 * k + 1]
        lin.append(linear_cka(a, b))
        deb.append(debiased_cka(a, b))
        cross.append(hsic_unbiased(centred_gram(a), centred_gram(b)))
    return SplitHalfCka(float(np.mean(lin)), float(np.mean(deb)), float(np.mean(cross)))
