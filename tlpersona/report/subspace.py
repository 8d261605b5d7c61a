"""Markdown section, files and figures of a shared-subspace result."""

from __future__ import annotations

from pathlib import Path

from tlpersona.analyses.subspace_result import SubspaceResult
from tlpersona.infra.files import atomic_write_bytes, json_bytes
from tlpersona.report import plots
from tlpersona.report.compare import fixed
from tlpersona.report.section import Section, write_section


def write_subspace(result: SubspaceResult, out: str | Path) -> Section:
    """Write subspace.json, pcs.safetensors, figures and subspace.md into ``out``; return them
    as its :class:`~tlpersona.report.section.Section`."""
    import numpy as np
    import torch

    from tlpersona.analyses.aligned import report_section as aligned_section
    from tlpersona.analyses.kfound import ALPHA
    from tlpersona.analyses.subspace_result import found_text, limits_text, null_text
    from tlpersona.infra.files import atomic_save_tensors

    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "subspace.json", json_bytes(result.to_dict()))
    atomic_save_tensors(out / "pcs.safetensors",
                        {f"layer_{k}": torch.from_numpy(np.ascontiguousarray(v)).float()
                         for k, v in result.components.items()})
    layers = result.layers
    mid = layers[len(layers) // 2]
    files = [out / "subspace.json", out / "pcs.safetensors",
             plots.subspace_variance(mid, figs / f"subspace_variance_L{mid.layer}.png"),
             plots.subspace_agreement(mid, result.thresholds,
                                      figs / f"subspace_agreement_L{mid.layer}.png"),
             plots.subspace_scatter(result.scores[mid.layer], mid.layer,
                                    figs / f"subspace_pc12_L{mid.layer}.png", result.personas)]
    rows = ["| layer | k_found (held out) | relabelled personas' k_found (descriptive) "
            "| variance of PC1 | \\|cos(PC1, first token)\\| |", "|---|---|---|---|---|"]
    for lay in layers:
        rows.append(f"| {lay.layer} | {found_text(lay.k_found)} | {null_text(lay.k_found)} | "
                    f"{lay.explained_variance_ratio[0]:.3f} | {fixed(lay.pc1_sink_cos)} |")
    th = result.thresholds
    held = mid.held_out  # the same split at every layer
    scale = ("each recipe scaled to unit total variance first, so the PCA ranks directions by "
             "how many recipes share them" if result.unit_norm else
             "recipes at their own scale, so the recipe with the largest norm dominates the PCs")
    lines = [
        "## Shared persona subspace", "",
        f"One PCA on every recipe's mean-centred centroids ({', '.join(result.positions)}; "
        f"{scale}; {result.n_personas} personas, split seed {result.seed}, input "
        f"manifest {result.inputs.manifest_hash[:12]}). k_found counts "
        "the shared PCs on which every pair of recipes orders the personas alike. Held out: "
        f"centring, scaling and PCA fitted on {held.n_fit} personas, scores taken on the other "
        f"{held.n_scored}; only the first {held.n_fit - 1} PCs can be counted. A PC counts "
        "when every pair of recipes orders the held-out personas alike on it beyond chance: per "
        "pair, the Pearson r of their held-out scores against the same r after permuting one "
        "recipe's held-out persona labels (the PCs, fitted without those personas, fixed), and "
        "the PC's p is the largest over the pairs (an intersection–union test: no correction "
        f"over pairs is needed), at p < {result.null.pc_level:.4g} ({ALPHA:g} split over the "
        f"{len(layers)} layer(s)); counting stops at the first PC that fails. A layer is called "
        "beyond chance when PC1's p, Holm-adjusted over every layer (a layer that found "
        f"nothing with p = 1), is below {ALPHA:g}: recipes of which some pair shares nothing "
        f"are called at any layer with probability ≤ {ALPHA:g}. The count beyond 1 is "
        "descriptive (a shared PC1's estimation error reaches the next PCs). "
        f"{limits_text(result.n_permutations, len(layers), held.n_scored)} "
        "The relabelled-personas column is descriptive: each draw relabels one recipe's "
        "personas at random, refits everything "
        f"and counts k_found by the same test ({result.null.n} draws; p = (1 + draws "
        "reaching k_found) / (draws + 1)). "
        "The last columns are descriptive: PC1's share of the variance and how closely PC1 "
        "follows the first token's residual (the attention sink). subspace.json also holds "
        f"in-sample counts (fitted and scored on the same personas, r > {th.min_r} per PC) "
        "and, held out and in sample, "
        "the largest K at which every pair, projected onto the top-K PCs, keeps per-persona min "
        f"cos > {th.min_cos} and cosine-matrix r > {th.min_r}; none of them has a test, so "
        "they are not reported here.", "",
        *rows, "",
        *aligned_section(result),
        f"![variance](figures/subspace_variance_L{mid.layer}.png)", "",
        f"![agreement](figures/subspace_agreement_L{mid.layer}.png)", "",
        f"![PC1-PC2](figures/subspace_pc12_L{mid.layer}.png)", "",
    ]
    return write_section(out / "subspace.md", "\n".join(lines), files)
