"""A persona subspace shared by every recipe: one PCA fitted on all recipes' centroids.

Per layer, each recipe's centroids ``[persona, d]`` are mean-centred across personas (and
optionally scaled to unit Frobenius norm, so no recipe dominates), stacked into
``[recipe × persona, d]``, and one PCA gives the shared PCs. For K = 1 … k_max every recipe is
projected onto the top-K shared PCs and the recipe pairs are scored there with the comparison's
statistics (per-persona cosine, mean-centred cosine-matrix Pearson r). ``k_found`` is the
largest K up to which every pair keeps agreeing (min cos > 0.85, r > 0.90), None if K = 1 fails;
``k_largest_passing`` is the largest K that passes at all. A 1-D projection makes
every cosine ±1, so small K is trivially agreeable; the largest K is the quantity of interest.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from tlpersona.analyses import metrics as M
from tlpersona.errors import TlpersonaError
from tlpersona.positions import RECIPES, canonical


@dataclass
class SubspaceConfig:
    positions: list[str] | None = None
    layers: list[int] | None = None
    k_max: int = 50
    unit_norm: bool = False
    min_cos: float = 0.85
    min_r: float = 0.90
    seed: int = 0


def prepare(x: np.ndarray, unit_norm: bool) -> np.ndarray:
    xc = M.mean_centre(x)
    return xc / np.linalg.norm(xc) if unit_norm else xc


def agreement_curve(mats: dict[str, np.ndarray], components: np.ndarray,
                    pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For K = 1 … len(components): per pair, per-persona cos (mean, min) and mean-centred
    matrix Pearson r of the recipes projected onto the top-K components (``[K, d]``)."""
    out = []
    for k in range(1, components.shape[0] + 1):
        proj = {p: m @ components[:k].T for p, m in mats.items()}
        row: dict[str, Any] = {"k": k, "pairs": {}}
        for x, y in pairs:
            cos = M.rowwise_cos(proj[x], proj[y])
            # undefined for K = 1, and for 2 personas (one pair: nothing to correlate)
            r = (M.matrix_agreement(M.mean_centre(proj[x]), M.mean_centre(proj[y]))["pearson"]
                 if k > 1 and len(proj[x]) > 2 else float("nan"))
            row["pairs"][f"{x}~{y}"] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                                        "mc_r": r}
        out.append(row)
    return out


def _passes(row: dict[str, Any], min_cos: float, min_r: float) -> bool:
    # K=1: cosine only, a correlation of 1-D cosine matrices being undefined
    return all(v["cos_min"] > min_cos and (row["k"] == 1 or v["mc_r"] > min_r)
               for v in row["pairs"].values())


def k_found(curve: list[dict[str, Any]], min_cos: float, min_r: float) -> int | None:
    """Largest K up to which every pair keeps min cos > ``min_cos`` and r > ``min_r`` at every
    K' ≤ K; None if K=1 already fails."""
    best = None
    for row in curve:
        if not _passes(row, min_cos, min_r):
            break
        best = row["k"]
    return best


def k_largest_passing(curve: list[dict[str, Any]], min_cos: float, min_r: float) -> int | None:
    """Largest K that passes, whether or not every smaller K does (a 1-D sign flip of one
    persona fails K=1 without saying much about the subspace)."""
    passing = [row["k"] for row in curve if _passes(row, min_cos, min_r)]
    return max(passing) if passing else None


def subspace(source: Any, cfg: SubspaceConfig | None = None) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Shared PCs per layer, agreement curves, k_found, held-out check and variance shares.

    Returns ``(results, {layer: components [k, d]})``.
    """
    cfg = cfg or SubspaceConfig()
    positions = ([canonical(p) for p in cfg.positions] if cfg.positions
                 else [p for p in RECIPES.values() if p in source.positions])
    if len(positions) < 2:
        raise TlpersonaError("the subspace needs at least two positions")
    missing = [p for p in positions if p not in source.positions]
    if missing:
        raise TlpersonaError(f"position {missing[0]} is not in the input")
    n = len(source.personas)
    if n < 4:
        raise TlpersonaError(f"the subspace needs at least 4 personas, got {n}")
    layers = cfg.layers or list(source.layers)
    pairs = list(itertools.combinations(positions, 2))
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    fit_half, test_half = perm[: n // 2], perm[n // 2:]
    results: dict[str, Any] = {"positions": positions, "n_personas": n, "unit_norm": cfg.unit_norm,
                               "thresholds": {"min_cos": cfg.min_cos, "min_r": cfg.min_r},
                               "layers": []}
    comps: dict[int, np.ndarray] = {}
    for layer in layers:
        li = source.layer_index(layer)
        raw = {p: source.centroids(p)[:, li].double().numpy() for p in positions}
        mats = {p: prepare(x, cfg.unit_norm) for p, x in raw.items()}
        stacked = np.concatenate([mats[p] for p in positions])
        k_max = min(cfg.k_max, stacked.shape[0] - 1, stacked.shape[1])
        pca = PCA(n_components=k_max, svd_solver="full").fit(stacked)
        comps[layer] = pca.components_
        curve = agreement_curve(mats, pca.components_, pairs)
        # Held out: PCs from half of the personas, scored on the other half only.
        fit = {p: prepare(x[fit_half], cfg.unit_norm) for p, x in raw.items()}
        k_half = min(k_max, len(fit_half) * len(positions) - 1)
        pca_half = PCA(n_components=k_half, svd_solver="full").fit(
            np.concatenate([fit[p] for p in positions]))
        test = {p: prepare(x[test_half], cfg.unit_norm) for p, x in raw.items()}
        held = agreement_curve(test, pca_half.components_, pairs)
        variance = {}
        for p in positions:
            x = mats[p]
            total = float(np.sum(x * x))
            shared = np.cumsum(np.sum((x @ pca.components_.T) ** 2, axis=0)) / total
            own = PCA(n_components=min(k_max, n - 1)).fit(x)
            own_cum = np.cumsum(own.explained_variance_ratio_)
            angles = [float(np.degrees(subspace_angles(own.components_[:k].T,
                                                       pca.components_[:k].T)).max())
                      for k in range(1, min(k_max, own.components_.shape[0]) + 1)]
            variance[p] = {"shared_cumulative": shared.tolist(), "own_cumulative": own_cum.tolist(),
                           "max_principal_angle_deg": angles}
        results["layers"].append({
            "layer": layer,
            "k_max": k_max,
            "k_found": k_found(curve, cfg.min_cos, cfg.min_r),
            "k_largest_passing": k_largest_passing(curve, cfg.min_cos, cfg.min_r),
            "k_found_held_out": k_found(held, cfg.min_cos, cfg.min_r),
            "k_largest_passing_held_out": k_largest_passing(held, cfg.min_cos, cfg.min_r),
            "held_out": {"n_fit": len(fit_half), "n_scored": len(test_half)},
            "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
            "curve": curve,
            "held_out_curve": held,
            "variance": variance,
        })
    return results, comps
