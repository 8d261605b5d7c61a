"""Figures for the reports (PNG). Figures are matplotlib ``Figure`` objects drawn without
pyplot, so importing this module leaves a notebook's matplotlib backend alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.colors
import numpy as np
from matplotlib.figure import Figure

from tlpersona.analyses import metrics as M
from tlpersona.files import atomic_write_with
from tlpersona.sources import ActivationSource

_VERDICT_CODE = {"KILL": 0, "GREY": 1, "PASS": 2}


def _pair_name(pair: list[str]) -> str:
    return f"{pair[0]} ~ {pair[1]}"


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
             **kw: Any) -> tuple[Figure, Any]:
    """A figure and its axes, as ``pyplot.subplots`` gives, without touching pyplot's state."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out and write ``path`` (PNG) through a temporary name."""
    fig.tight_layout()
    # "tight" grows the canvas to every label and title, so none is cut at the edge
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png",
                                                    bbox_inches="tight", pad_inches=0.1))
    return path


def verdict_heatmap(result: dict[str, Any], path: Path) -> Path:
    pairs = list(dict.fromkeys(_pair_name(c["pair"]) for c in result["cells"]))
    layers = result["layers"]
    grid = np.full((len(pairs), len(layers)), np.nan)
    for c in result["cells"]:
        grid[pairs.index(_pair_name(c["pair"])), layers.index(c["layer"])] = _VERDICT_CODE[c["verdict"]]
    # the pair labels take the left of the figure: the width leaves the title room beside them
    fig, ax = subplots(figsize=(3.4 + 0.9 * len(layers), 1.0 + 0.35 * len(pairs)))
    cmap = matplotlib.colors.ListedColormap(["#d9534f", "#bbbbbb", "#5cb85c"])
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, aspect="auto")
    names = {v: k for k, v in _VERDICT_CODE.items()}
    for i in range(len(pairs)):
        for j in range(len(layers)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, names[int(grid[i, j])], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(layers)), [f"L{x}" for x in layers])
    ax.set_yticks(range(len(pairs)), pairs, fontsize=7)
    fig.suptitle("Verdict per recipe pair and layer", fontsize=10)
    return save_figure(fig, path)


def cosine_violins(result: dict[str, Any], layer: int, path: Path) -> Path:
    cells = [c for c in result["cells"] if c["layer"] == layer]
    fig, ax = subplots(figsize=(max(6, 0.45 * len(cells)), 4))
    data = [np.asarray(c["per_persona_cos_all"]) for c in cells]
    ax.violinplot(data, showmedians=True)
    th = result["thresholds"]
    ax.axhline(th["pass_min_cos"], color="#5cb85c", lw=0.8, ls="--", label="PASS min cos")
    ax.axhline(th["kill_min_cos"], color="#d9534f", lw=0.8, ls="--", label="KILL min cos")
    ax.set_xticks(range(1, len(cells) + 1), [_pair_name(c["pair"]) for c in cells],
                  rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("per-persona cosine")
    ax.set_title(f"Per-persona cosine between recipes, layer {layer}")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def matrix_bars(result: dict[str, Any], layer: int, path: Path) -> Path:
    cells = [c for c in result["cells"] if c["layer"] == layer]
    fig, ax = subplots(figsize=(max(6, 0.45 * len(cells)), 4))
    x = np.arange(len(cells))
    ax.bar(x - 0.2, [c["matrix_raw"]["pearson"] for c in cells], 0.4, label="raw r")
    ax.bar(x + 0.2, [c["matrix_mc"]["pearson"] for c in cells], 0.4, label="mean-centred r")
    ceilings = [np.nan if c["ceiling"]["matrix_mc_pearson"] is None else c["ceiling"]["matrix_mc_pearson"]
                for c in cells]
    ax.scatter(x + 0.2, ceilings, color="k", marker="_", s=200, zorder=3,
               label="ceiling: split-half r, Spearman-Brown (geometric mean of the two recipes)")
    ax.scatter(x + 0.2, [c["matrix_mc"]["null_p95"] for c in cells], color="#d9534f", marker="_",
               s=200, zorder=3, label="null: 95th percentile, shuffled personas")
    ax.axhline(result["thresholds"]["pass_mc_r"], color="#5cb85c", lw=0.8, ls="--")
    ax.set_xticks(x, [_pair_name(c["pair"]) for c in cells], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("Pearson r of cosine matrices")
    ax.set_title(f"Inter-persona matrix agreement, layer {layer}")
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


def cosine_matrices(source: ActivationSource, positions: list[str], layer: int, path: Path) -> Path:
    li = source.layer_index(layer)
    fig, axes = subplots(1, len(positions), figsize=(2.6 * len(positions), 2.8))
    axes = np.atleast_1d(axes)
    for ax, pos in zip(axes, positions, strict=True):
        m = M.cos_matrix(M.mean_centre(source.centroids(pos)[:, li].double().numpy()))
        ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(pos, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Mean-centred inter-persona cosine matrices, layer {layer}", fontsize=9)
    return save_figure(fig, path)


def subspace_variance(layer: dict[str, Any], path: Path) -> Path:
    fig, ax = subplots(figsize=(6, 4))
    for i, (pos, v) in enumerate(layer["variance"].items()):
        color = f"C{i}"
        k = np.arange(1, len(v["shared_cumulative"]) + 1)
        ax.plot(k, v["shared_cumulative"], color=color, label=f"{pos}: shared PCs")
        ax.plot(np.arange(1, len(v["own_cumulative"]) + 1), v["own_cumulative"], color=color,
                ls=":", label=f"{pos}: own PCs")
    ax.set_xlabel("K")
    ax.set_ylabel("between-persona variance explained")
    ax.set_title(f"Variance captured by K shared vs own PCs, layer {layer['layer']}")
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def subspace_agreement(layer: dict[str, Any], th: dict[str, float], path: Path) -> Path:
    """Per shared PC, each pair's correlation of persona scores (held out: solid; in sample:
    dotted), with what the weakest pair had to exceed for the PC to count as shared (the
    per-PC test's bar; the fixed ``min_r`` where no null ran)."""
    fig, ax = subplots(figsize=(6, 4))
    held, ins = layer["per_pc"], layer["per_pc_in_sample"]
    for i, pair in enumerate(held[0]["pairs"] if held else []):
        ax.plot([row["pc"] for row in held], [row["pairs"][pair] for row in held],
                color=f"C{i % 10}", label=pair, lw=1, marker=".")
        ax.plot([row["pc"] for row in ins], [row["pairs"][pair] for row in ins],
                color=f"C{i % 10}", ls=":", lw=0.7)
    bar = layer.get("per_pc_threshold")
    if bar and held and any(b is not None for b in bar):
        # the per-PC test's bar: what the relabelled draws reach on that PC (held out)
        pcs = [row["pc"] for row in held][: len(bar)]
        ax.step(pcs, [np.nan if b is None else b for b in bar[: len(pcs)]], where="mid",
                color="k", lw=0.8, ls="--", label="needed (relabelled null)")
    else:
        ax.axhline(th["min_r"], color="k", lw=0.8, ls="--")
    ax.set_xlabel("shared PC (dotted: in sample)")
    ax.set_ylabel("r of the two recipes' persona scores")
    ax.set_title(f"Which shared PCs every recipe shares, layer {layer['layer']}: "
                 f"k_found = {layer['k_found']}", fontsize=9)
    ax.legend(fontsize=5, ncol=2)
    return save_figure(fig, path)


def subspace_scatter(coords: dict[str, np.ndarray], layer: int, path: Path) -> Path:
    """``coords[recipe]``: ``[persona, 2]`` on PC1–PC2; lines join one persona across recipes."""
    fig, ax = subplots(figsize=(5.5, 5))
    recipes = list(coords)
    stacked = np.stack([coords[r] for r in recipes])  # [recipe, persona, 2]
    for p in range(stacked.shape[1]):
        ax.plot(stacked[:, p, 0], stacked[:, p, 1], color="#cccccc", lw=0.5, zorder=1)
    markers = "os^vD<>pP*"
    for i, r in enumerate(recipes):
        ax.scatter(stacked[i, :, 0], stacked[i, :, 1], s=14, marker=markers[i % len(markers)],
                   label=r, zorder=2)
    ax.set_xlabel("shared PC1")
    ax.set_ylabel("shared PC2")
    ax.set_title(f"Personas on the shared PCs, layer {layer}")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def ranked_bars(values: dict[str, np.ndarray], personas: list[str],
                marks: dict[str, list[tuple[str, float]]], label: str, layer: int, path: Path) -> Path:
    """One panel per recipe: stored personas ranked by their coordinate, new items as lines."""
    fig, axes = subplots(1, len(values), figsize=(3.2 * len(values), 0.5 + 0.16 * len(personas)),
                             squeeze=False)
    for ax, (recipe, v) in zip(axes[0], values.items(), strict=True):
        order = np.argsort(v)
        ax.barh(range(len(v)), v[order], color="#7a9cc6")
        ax.set_yticks(range(len(v)), [personas[i] for i in order], fontsize=5)
        for name, x in marks.get(recipe, []):
            ax.axvline(x, color="#d9534f", lw=0.8)
            ax.text(x, len(v) - 0.5, name, fontsize=5, rotation=90, va="top", color="#d9534f")
        ax.set_title(recipe, fontsize=8)
        ax.set_xlabel(label, fontsize=7)
    fig.suptitle(f"Personas on {label}, layer {layer}", fontsize=9)
    return save_figure(fig, path)


def patching_heatmap(cells: list[Any], rows: list[str], layers: list[int], title: str,
                     path: Path) -> Path:
    """Two panels (KL and logit-difference effect): positions × layers, 0 = corrupt, 1 = clean.
    ``cells``: :class:`~tlpersona.interventions.patching.CellEffect` of one method and component."""
    fig, axes = subplots(1, 2, figsize=(2.5 + 1.2 * len(layers), 1.2 + 0.3 * len(rows)),
                             squeeze=False)
    for ax, key, name in zip(axes[0], ("kl_effect", "ld_effect"),
                             ("KL effect", "logit-difference effect"), strict=True):
        grid = np.full((len(rows), len(layers)), np.nan)
        for c in cells:
            grid[rows.index(c.position), layers.index(c.layer)] = getattr(c, key)
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(layers)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(layers)), [f"L{x}" for x in layers], fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(f"{name} ({title})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path)


def head_heatmap(cells: list[Any], layers: list[int], n_heads: int, title: str, path: Path,
                 panels: int = 6) -> Path:
    """KL effect of each head (layers × heads), one panel per position: the ``panels``
    positions whose largest absolute effect is largest."""
    by_pos: dict[str, np.ndarray] = {}
    for c in cells:
        grid = by_pos.setdefault(c.position, np.full((len(layers), n_heads), np.nan))
        grid[layers.index(c.layer), c.head] = c.kl_effect
    top = sorted(by_pos, key=lambda p: -np.nanmax(np.abs(by_pos[p]), initial=0.0))[:panels]
    fig, axes = subplots(1, max(1, len(top)), squeeze=False,
                             figsize=(1.5 + (1.0 + 0.18 * n_heads) * max(1, len(top)),
                                      1.5 + 0.25 * len(layers)))
    for ax, pos in zip(axes[0], top, strict=False):
        im = ax.imshow(by_pos[pos], cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xlabel("head", fontsize=7)
        ax.set_yticks(range(len(layers)), [f"L{x}" for x in layers], fontsize=6)
        ax.set_title(pos, fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"KL effect per head ({title})", fontsize=9)
    return save_figure(fig, path)
