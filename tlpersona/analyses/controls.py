"""Controls: the split-half noise floor and the B*_no_last algebra check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tlpersona.analyses import metrics as M
from tlpersona.cache.source import ActivationSource
from tlpersona.infra.resultjson import OMIT_NONE, to_json

CHUNK = 32  # personas read at a time: [32, 240, 4, 3584] fp32 is ~0.4 GB


def split_masks(n_q: int, n_splits: int, seed: int) -> np.ndarray:
    """``[2K, question]`` 0/1 masks: rows 2k and 2k+1 are the two halves of split k."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((2 * n_splits, n_q), dtype=np.float32)
    for k in range(n_splits):
        perm = rng.permutation(n_q)
        masks[2 * k, perm[: n_q // 2]] = 1
        masks[2 * k + 1, perm[n_q // 2:]] = 1
    return masks


def half_centroids(per_q: torch.Tensor, valid: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """Centroid of every half of every split: ``[persona, q, d]`` → ``[persona, 2K, d]``."""
    w = torch.from_numpy(masks)[None] * valid.float()[:, None]
    w = w / w.sum(-1, keepdim=True).clamp(min=1)
    return torch.bmm(w, per_q.float())


def spearman_brown(r: float) -> float:
    """Agreement of full-size centroids predicted from the agreement ``r`` of half-size ones
    (each half averages half the questions): ``2r / (1 + r)``."""
    return 2 * r / (1 + r) if r > -1 else float("nan")


#: Question splits the held-out Procrustes ceiling averages over (each costs two Gram matrices
#: and a dozen small eigendecompositions per recipe and layer).
PROCRUSTES_FLOOR_SPLITS = 2


@dataclass(frozen=True)
class FloorStats:
    """A recipe's split-half agreement at one layer (:func:`floor_stats`): what identical
    recipes reach, at half size and (``*_full``) Spearman–Brown corrected to full size."""

    exact: bool  # False: estimated from question halves
    n_splits: int
    half_size: bool
    per_persona_cos_mean: float
    per_persona_cos_min: float  # over every split
    per_persona_cos_min_split_mean: float
    matrix_mc_pearson_mean: float
    matrix_mc_pearson_min: float
    matrix_mc_pearson_full: float
    per_persona_cos_mean_full: float
    per_persona_cos_min_full: float
    procrustes_cos_mean: float | None  # None with too few personas
    procrustes_cos_mean_full: float | None


@dataclass(frozen=True)
class FloorReason:
    """Why a recipe has no split-half floor at a layer: ``exact`` True where it needs none
    (question-invariant: no sampling noise), None where it is unknown."""

    exact: bool | None
    reason: str


def floor_stats(halves: np.ndarray, iu: tuple[np.ndarray, np.ndarray], seed: int = 0) -> FloorStats:
    """Split-half agreement from ``[persona, 2K, d]`` half centroids, with the statistics the
    recipe pairs get: per-persona cosine, mean-centred cosine-matrix Pearson r and the held-out
    Procrustes cosine (the comparison's procedure, on the first splits; None with too few
    personas).

    Each half averages half of the questions, so these are floors for half-size centroids; the
    ``*_full`` values are Spearman–Brown values for full-size ones, the size the recipe pairs are
    scored at (for a cosine of signal plus independent noise, halving the noise variance maps
    c to 2c/(1 + c) in expectation, in high dimensions, as it does a reliability).
    """
    cos_mean, cos_min, rs, procs = [], [], [], []
    for k in range(halves.shape[1] // 2):
        a, b = halves[:, 2 * k], halves[:, 2 * k + 1]
        c = M.rowwise_cos(a, b)
        cos_mean.append(c.mean())
        cos_min.append(c.min())
        ma = M.cos_matrix(M.mean_centre(a))[iu]
        mb = M.cos_matrix(M.mean_centre(b))[iu]
        rs.append(np.corrcoef(ma, mb)[0, 1])
        if k < PROCRUSTES_FLOOR_SPLITS:
            h = M.HeldOutProcrustes(a.shape[0], M.PROCRUSTES_SPLITS, np.random.default_rng(seed), 0)
            h.add("a", a)
            h.add("b", b)
            procs.append(h.mean_score("a", "b"))
    r_mean = float(np.mean(rs))
    proc = None if not procs or procs[0] is None else float(np.mean(np.asarray(procs, float)))
    return FloorStats(
        exact=False,
        n_splits=halves.shape[1] // 2,
        half_size=True,
        per_persona_cos_mean=float(np.mean(cos_mean)),
        per_persona_cos_min=float(np.min(cos_min)),
        per_persona_cos_min_split_mean=float(np.mean(cos_min)),
        matrix_mc_pearson_mean=r_mean,
        matrix_mc_pearson_min=float(np.min(rs)),
        matrix_mc_pearson_full=spearman_brown(r_mean),
        per_persona_cos_mean_full=spearman_brown(float(np.mean(cos_mean))),
        per_persona_cos_min_full=spearman_brown(float(np.mean(cos_min))),
        procrustes_cos_mean=proc,
        procrustes_cos_mean_full=None if proc is None else spearman_brown(proc),
    )


def noise_floor(per_q: np.ndarray, valid: np.ndarray, n_splits: int, seed: int,
                iu: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """How well a recipe agrees with itself across two random halves of the questions.

    ``per_q``: ``[persona, question, d]``; ``valid``: ``[persona, question]``; ``n_splits``
    seeded random splits. Returns the floor as results.json holds it (:class:`FloorStats`, or
    :class:`FloorReason` with fewer than 2 questions).
    """
    if per_q.shape[1] < 2:
        return to_json(FloorReason(None, "fewer than 2 questions"))
    masks = split_masks(per_q.shape[1], n_splits, seed)
    halves = half_centroids(torch.as_tensor(per_q), torch.as_tensor(valid), masks)
    return to_json(floor_stats(halves.double().numpy(), iu, seed))


@dataclass(frozen=True)
class BStarLayer:
    """cos(A, B*) and cos(A, B*_no_last) per persona at one layer; where prompt lengths are
    exact, the worst relative error of the identity and whether it holds."""

    cos_a_bstar: M.Summary
    cos_a_bstar_no_last: M.Summary
    identity_max_rel_error: float | None = field(default=None, metadata=OMIT_NONE)
    identity_holds: bool | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True)
class BStarCheck:
    """The B*_no_last algebra check (:func:`bstar_check`): ``reason`` where it could not run,
    else per layer :class:`BStarLayer`, and ``identity_note`` where the identity was not
    checked."""

    available: bool
    reason: str | None = field(default=None, metadata=OMIT_NONE)
    layers: dict[int, BStarLayer] | None = field(default=None, metadata=OMIT_NONE)
    identity_note: str | None = field(default=None, metadata=OMIT_NONE)


def bstar_check(source: ActivationSource, layers: list[int]) -> BStarCheck:
    """How much of cos(A, B*) is arithmetic: B* averages A's token in.

    Reports cos(A, B*) against cos(A, B*_no_last) per layer (per-persona centroids), and checks
    the identity ``B* = ((n-1)·B*_no_last + A)/n`` per question, where n is the prompt length.
    """
    need = ("last", "prompt_mean", "prompt_mean_no_last")
    if not all(p in source.positions for p in need):
        return BStarCheck(False, reason="needs last, prompt_mean and prompt_mean_no_last")
    rows: dict[int, BStarLayer] = {}
    n_tok = source.n_tokens("prompt_mean")
    exact_n = n_tok is not None and source.provenance.get("prompt_index") != "all"
    if n_tok is not None and exact_n and source.has_per_question("last"):
        worst = _identity_errors(source, n_tok)
    for layer in layers:
        li = source.layer_index(layer)
        a, b, c = (source.centroids(p)[:, li].double().numpy() for p in need)
        checked = exact_n and source.has_per_question("last")
        rows[layer] = BStarLayer(
            M.Summary.of(M.rowwise_cos(a, b)), M.Summary.of(M.rowwise_cos(a, c)),
            worst[li] if checked else None,
            # fp16 storage: ~5e-4 relative precision
            bool(worst[li] < 5e-3) if checked else None)
    note = (None if exact_n else "identity not checked: prompt lengths unknown or averaged over "
            "several system-prompt phrasings")
    return BStarCheck(True, layers=rows, identity_note=note)


def _identity_errors(source: ActivationSource, n_tok: torch.Tensor) -> list[float]:
    """Worst relative error of ``B* = ((n-1)·B*_no_last + A)/n`` over persona × question, per
    stored layer, streamed ``CHUNK`` personas at a time."""
    valid = source.valid("prompt_mean") & source.valid("last")
    n_p = valid.shape[0]
    worst = torch.zeros(len(source.layers), dtype=torch.float64)
    for start in range(0, n_p, CHUNK):
        stop = min(start + CHUNK, n_p)
        a, b, c = (source.per_question_rows(p, start, stop).float()
                   for p in ("last", "prompt_mean", "prompt_mean_no_last"))
        n = n_tok[start:stop].float()[:, :, None, None]
        rel = (b - ((n - 1) * c + a) / n).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-12)
        rel[~valid[start:stop]] = 0
        worst = torch.maximum(worst, rel.amax(dim=(0, 1)).double())
    return [float(w) for w in worst]
