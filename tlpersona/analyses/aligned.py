"""A Procrustes-aligned shared subspace: recipes whose persona geometry is the same up to a
rotation of the residual basis share it, although a joint PCA of their raw coordinates does not.

Per layer, with the personas split as for the plain held-out ``k_found``
(:func:`tlpersona.analyses.subspace.held_out`):

1. each recipe is centred (and, by default, scaled to unit total variance) with its fit half's
   mean and scale, and expressed in its fit half's top principal directions (rank at most
   n_fit − 1, capped at :data:`tlpersona.analyses.metrics.MAX_RANK`);
2. the recipes' fit rows are rotated onto a common frame by generalised orthogonal Procrustes
   (``scipy.linalg.orthogonal_procrustes``), in the smallest rank of the recipes: every recipe
   is rotated onto the first recipe's rows, then, for :data:`GPA_ITERATIONS` rounds, onto the
   mean of the rotated recipes (so no recipe's own dimensions serve as everyone's target);
3. one PCA of the stacked, aligned fit rows gives the shared PCs, in that common frame;
4. the test rows go through the same centring, principal directions and rotations (fitted on the
   fit half only), and ``k_found`` counts the leading PCs on which every recipe pair orders the
   test personas alike beyond chance, by the plain variant's test
   (:func:`tlpersona.analyses.kfound.count_shared`, the same label permutations): everything
   a pair's scores depend on was fitted without the test personas, so permuting one recipe's
   test labels is exact under that pair's null, the rotations included.

The relabelled draws (descriptive) relabel the last recipe's personas and rerun all of it (the
alignment included), so they show what K a rotation fitted to an unrelated recipe reaches. The
in-sample value fits and scores on every persona: the rotations then fit the scored personas
too, so it is optimistic.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.linalg import orthogonal_procrustes
from sklearn.decomposition import PCA

from tlpersona.analyses.kfound import ALPHA, Centring, agreement_from_scores, count_shared, k_found, null_p
from tlpersona.analyses.metrics import MAX_RANK
from tlpersona.analyses.subspace_result import (
    AlignedLayer,
    SubspaceResult,
    found_text,
    null_text,
    pc_rows,
)

#: Rounds of generalised Procrustes; the mean frame settles within a few on planted data.
GPA_ITERATIONS = 20

#: Alignment variants of the shared subspace (``none``: the plain joint PCA).
ALIGNMENTS = ("none", "procrustes")


def _principal(x_fit: np.ndarray, x_other: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the (already centred) fit rows ``[n_fit, d]`` and other rows ``[n, d]`` in
    the fit rows' top ``rank`` principal directions (the fit rows' rank bounds ``rank``)."""
    _, s, vt = np.linalg.svd(x_fit, full_matrices=False)
    keep = int(np.sum(s > s[0] * 1e-10)) if s.size and s[0] > 0 else 0
    v = vt[: min(rank, keep)].T
    return x_fit @ v, x_other @ v


def aligned_rows(raw: dict[str, np.ndarray], positions: list[str], fit: np.ndarray,
                 test: np.ndarray, unit_norm: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every recipe's fit and test rows in the common frame, rotated there by maps fitted on the
    fit rows only. ``raw[p]``: ``[persona, d]``; returns two dicts of
    ``[n_fit, r]`` and ``[n_test, r]``."""
    cap = min(len(fit) - 1, MAX_RANK)
    coords = {}
    for p in positions:
        c = Centring.fit(raw[p][fit], unit_norm)
        coords[p] = _principal(c.apply(raw[p][fit]), c.apply(raw[p][test]), cap)
    r = min(f.shape[1] for f, _ in coords.values())
    fits = {p: coords[p][0][:, :r] for p in positions}
    rots = {p: np.eye(r) for p in positions}
    target = fits[positions[0]]
    for _ in range(GPA_ITERATIONS):
        rots = {p: orthogonal_procrustes(fits[p], target)[0] for p in positions}
        target = np.mean([fits[p] @ rots[p] for p in positions], axis=0)
    return ({p: fits[p] @ rots[p] for p in positions},
            {p: coords[p][1][:, :r] @ rots[p] for p in positions})


def aligned_scores(raw: dict[str, np.ndarray], positions: list[str], fit: np.ndarray,
                   test: np.ndarray, unit_norm: bool) -> dict[str, np.ndarray]:
    """Each recipe's aligned test rows scored on the shared PCs of the aligned fit rows
    ``[n_test, PC]`` (no PC when the common frame is empty)."""
    fit_rows, test_rows = aligned_rows(raw, positions, fit, test, unit_norm)
    stacked = np.concatenate([fit_rows[p] for p in positions])
    k = min(stacked.shape[1], stacked.shape[0] - 1)
    if k < 1:
        return {p: np.zeros((len(test), 0)) for p in positions}
    pca = PCA(n_components=k, svd_solver="full").fit(stacked)
    return {p: x @ pca.components_.T for p, x in test_rows.items()}


def aligned_per_pc(raw: dict[str, np.ndarray], positions: list[str], pairs: list[tuple[str, str]],
                   fit: np.ndarray, test: np.ndarray, unit_norm: bool) -> list[dict[str, Any]]:
    """Shared PCs of the aligned fit rows, scored per PC on the aligned test rows."""
    return agreement_from_scores(aligned_scores(raw, positions, fit, test, unit_norm), pairs)


def aligned_layer(raw: dict[str, np.ndarray], positions: list[str], pairs: list[tuple[str, str]],
                  fit: np.ndarray, test: np.ndarray, relabels: list[np.ndarray],
                  perms: np.ndarray, unit_norm: bool, min_r: float,
                  level: float = ALPHA) -> AlignedLayer:
    """Held-out aligned ``k_found`` by the per-PC test (``perms``: orderings of the test
    personas, as for the plain variant), its relabelled draws (``relabels``: persona
    permutations applied to the last recipe, each counted by the same test) and the in-sample
    value. Its Holm p-values need every layer: the caller sets them (they are NaN / None
    here)."""
    scores = aligned_scores(raw, positions, fit, test, unit_norm)
    held = agreement_from_scores(scores, pairs)
    count = count_shared(scores, pairs, perms, level)
    null = []
    for relabel in relabels:
        shuffled = {**raw, positions[-1]: raw[positions[-1]][relabel]}
        draw = aligned_scores(shuffled, positions, fit, test, unit_norm)
        null.append(count_shared(draw, pairs, perms, level, full=False).k)
    every = np.arange(len(next(iter(raw.values()))))
    in_sample = aligned_per_pc(raw, positions, pairs, every, every, unit_norm)
    return AlignedLayer(
        reference=positions[0],
        rank=len(held),
        k=count.k,
        k_found_saturated=bool(count.k) and count.k == len(held),
        k_found_in_sample=k_found(in_sample, min_r),
        k_found_p=count.p,
        k_found_null=null,
        k_found_null_p=null_p(count.k, null),
        per_pc_p_iut=count.per_pc_p,
        per_pc_pair_p=count.per_pc_pair_p,
        per_pc_threshold=count.per_pc_threshold,
        per_pc=pc_rows(held),
        n_fit=len(fit),
        n_scored=len(test),
        k_found_p_holm=math.nan,
        k_found_null_p_holm=None,
    )


def report_section(result: SubspaceResult) -> list[str]:
    """Markdown lines saying which variant of the shared subspace was computed, and the aligned
    values when they were."""
    aligned = [(lay.layer, lay.aligned_layer) for lay in result.layers
               if lay.aligned_layer is not None]
    if result.align == "none" or not aligned:
        return ["Variant: plain joint PCA only (recipes in their own residual basis; "
                "`--align procrustes` adds a rotation-aligned subspace).", ""]
    first = aligned[0][1]
    rows = ["| layer | aligned k_found (held out) | relabelled personas' k_found (descriptive) "
            "| aligned rank |",
            "|---|---|---|---|"]
    for layer, a in aligned:
        rows.append(f"| {layer} | {found_text(a.k_found)} | {null_text(a.k_found)} | {a.rank} |")
    return [
        "### Rotation-aligned shared subspace (`--align procrustes`)", "",
        f"Variant: plain joint PCA above, and here the same recipes each rotated onto a common frame "
        f"first (generalised orthogonal Procrustes, starting from {first.reference}), so a "
        "persona geometry that every recipe has in its own rotated basis counts as shared. Each "
        "recipe is centred and scaled with its fit half, expressed in the fit half's principal "
        f"directions, rotated by maps fitted on the {first.n_fit} fit personas only, and "
        f"k_found counted on the other {first.n_scored} by the same test as above (the same "
        "label permutations; the rotations, fitted without the scored personas, stay fixed, so "
        "each pair's p is exact; Holm over the layers as above). The relabelled draws rerun the "
        "alignment too (descriptive). The aligned k_found is a lower bound, more so than the "
        "plain one: the rotations "
        "also map each recipe's own dimensions onto the others', and where those are as large as "
        "the shared ones the pooled PCA mixes them into the shared PCs (planted: 2 shared "
        "dimensions beside 3 own ones of equal size per recipe, 100 personas: 1 found). The "
        "in-sample count (rotations fitted on the scored personas too) is in subspace.json "
        "only: it has no test.", "",
        *rows, "",
    ]
