"""Figures for the reports (PNG). Figures are matplotlib ``Figure`` objects drawn without
pyplot, so importing this module leaves a notebook's matplotlib backend alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import matplotlib.colors
import numpy as np
from matplotlib.figure import Figure

from tlpersona.infra.files import atomic_write_with

if TYPE_CHECKING:
    from tlpersona.analyses.compare.result import CompareResult
    from tlpersona.analyses.subspace_result import SubspaceLayer, SubspaceThresholds

_VERDICT_CODE = {"KILL": 0, "GREY": 1, "PASS": 2}


def _pair_name(pair: Sequence[str]) -> str:
    return f"{pair[0]} ~ {pair[1]}"


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
             layout: Literal["constrained"] | None = None, **kw: Any) -> tuple[Figure, Any]:
    """A figure and its axes, as ``pyplot.subplots`` gives, without touching pyplot's state;
    ``layout="constrained"`` lays out legends placed outside the axes too."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, **kw)


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out and write ``path`` (PNG) through a temporary name."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    # "tight" grows the canvas to every label and title, so none is cut at the edge
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png",
                                                    bbox_inches="tight", pad_inches=0.1))
    return path


def _legend_above(fig: Figure, ax: Any) -> None:
    """The axes' legend above them, outside the plotted area (it covers no bar or point)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=min(2, len(labels)),
               fontsize=7, frameon=False)


def distinct_colours(n: int) -> list[Any]:
    """``n`` colours that stay apart: the tab10/tab20 palettes up to 20, else evenly spaced
    along a perceptual rainbow (a 10-colour cycle repeats colours from the eleventh line)."""
    import matplotlib

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](x) for x in np.linspace(0.03, 0.97, n)]


def verdict_heatmap(result: CompareResult, path: Path) -> Path:
    pairs = list(dict.fromkeys(_pair_name(c.pair) for c in result.cells))
    layers = result.layers
    grid = np.full((len(pairs), len(layers)), np.nan)
    for c in result.cells:
        grid[pairs.index(_pair_name(c.pair)), layers.index(c.layer)] = _VERDICT_CODE[c.verdict]
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


def cosine_violins(result: CompareResult, layer: int, path: Path) -> Path:
    cells = [c for c in result.cells if c.layer == layer]
    fig, ax = subplots(figsize=(max(6, 0.45 * len(cells)), 4), layout="constrained")
    data = [np.asarray(c.per_persona_cos_all) for c in cells]
    ax.violinplot(data, showmedians=True)
    th = result.thresholds
    ax.axhline(th.pass_min_cos, color="#5cb85c", lw=0.8, ls="--", label="PASS min cos")
    ax.axhline(th.kill_min_cos, color="#d9534f", lw=0.8, ls="--", label="KILL min cos")
    ax.set_xticks(range(1, len(cells) + 1), [_pair_name(c.pair) for c in cells],
                  rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("per-persona cosine")
    ax.set_title(f"Per-persona cosine between recipes, layer {layer}")
    _legend_above(fig, ax)
    return save_figure(fig, path)


def matrix_bars(result: CompareResult, layer: int, path: Path) -> Path:
    cells = [c for c in result.cells if c.layer == layer]
    fig, ax = subplots(figsize=(max(6, 0.45 * len(cells)), 4), layout="constrained")
    x = np.arange(len(cells))
    raw, mc = [c.matrix_raw.pearson for c in cells], [c.matrix_mc.pearson for c in cells]
    ax.bar(x - 0.2, [np.nan if r is None else r for r in raw], 0.4, label="raw r")
    ax.bar(x + 0.2, [np.nan if r is None else r for r in mc], 0.4, label="mean-centred r")
    ceilings = [np.nan if c.ceiling.matrix_mc_pearson is None else c.ceiling.matrix_mc_pearson
                for c in cells]
    ax.scatter(x + 0.2, ceilings, color="k", marker="_", s=200, zorder=3,
               label="ceiling: split-half r, Spearman-Brown (geometric mean of the two recipes)")
    ax.scatter(x + 0.2, [c.matrix_mc.null_p95 for c in cells], color="#d9534f", marker="_",
               s=200, zorder=3, label="null: 95th percentile, shuffled personas")
    ax.axhline(result.thresholds.pass_mc_r, color="#5cb85c", lw=0.8, ls="--")
    ax.set_xticks(x, [_pair_name(c.pair) for c in cells], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("Pearson r of cosine matrices")
    ax.set_title(f"Inter-persona matrix agreement, layer {layer}")
    _legend_above(fig, ax)
    return save_figure(fig, path)


def cosine_matrices(matrices: dict[str, np.ndarray], personas: Sequence[str], layer: int,
                    path: Path) -> Path:
    """One panel per recipe (``matrices``: recipe -> its mean-centred inter-persona cosine
    matrix ``[persona, persona]``, four to a row), personas (``personas``, in the rows' order)
    named on the left of each row; one colour bar for all."""
    positions = list(matrices)
    ncols = min(4, len(positions))
    nrows = -(-len(positions) // ncols)
    fig, axes = subplots(nrows, ncols, figsize=(1.2 + 2.6 * ncols, 0.6 + 2.7 * nrows),
                         squeeze=False, layout="constrained")
    names = list(personas)
    small = max(3.0, min(7.0, 160 / max(len(names), 1)))  # ~one text line per matrix row
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(positions):
            ax.set_visible(False)
            continue
        pos = positions[k]
        im = ax.imshow(matrices[pos], cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(pos, fontsize=8)
        ax.set_xticks([])
        if k % ncols == 0:
            ax.set_yticks(range(len(names)), names, fontsize=small)
        else:
            ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), shrink=0.6, label="cosine (mean-centred)")
    fig.suptitle(f"Mean-centred inter-persona cosine matrices, layer {layer}", fontsize=9)
    return save_figure(fig, path)


def subspace_variance(layer: SubspaceLayer, path: Path) -> Path:
    fig, ax = subplots(figsize=(8, 4), layout="constrained")
    for i, (pos, v) in enumerate(layer.variance.items()):
        color = f"C{i}"
        k = np.arange(1, len(v.shared_cumulative) + 1)
        ax.plot(k, v.shared_cumulative, color=color, label=f"{pos}: shared PCs")
        ax.plot(np.arange(1, len(v.own_cumulative) + 1), v.own_cumulative, color=color,
                ls=":", label=f"{pos}: own PCs")
    ax.set_xlabel("K")
    ax.set_ylabel("between-persona variance explained")
    ax.set_title(f"Variance captured by K shared vs own PCs, layer {layer.layer}")
    fig.legend(loc="outside right center", fontsize=6, frameon=False)
    return save_figure(fig, path)


def subspace_agreement(layer: SubspaceLayer, th: SubspaceThresholds, path: Path) -> Path:
    """Per shared PC, each pair's correlation of persona scores (held out: solid; in sample:
    dotted), with what the weakest pair had to exceed for the PC to count as shared (the
    per-PC test's bar; the fixed ``min_r`` where no null ran)."""
    held, ins = layer.per_pc, layer.per_pc_in_sample
    pairs = list(held[0].pairs) if held else []
    fig, ax = subplots(figsize=(6 + 2.2 * (1 + len(pairs) // 25), 4), layout="constrained")
    colours = distinct_colours(len(pairs))
    for pair, colour in zip(pairs, colours, strict=True):
        ax.plot([row.pc for row in held], [row.pairs[pair] for row in held],
                color=colour, label=pair, lw=1, marker=".")
        ax.plot([row.pc for row in ins], [row.pairs[pair] for row in ins],
                color=colour, ls=":", lw=0.7)
    bar = layer.per_pc_threshold
    if bar and held and any(b is not None for b in bar):
        # the per-PC test's bar: the largest r a pair must exceed against its label permutations
        pcs = [row.pc for row in held][: len(bar)]
        ax.step(pcs, [np.nan if b is None else b for b in bar[: len(pcs)]], where="mid",
                color="k", lw=0.8, ls="--", label="needed (label permutations)")
    else:
        ax.axhline(th.min_r, color="k", lw=0.8, ls="--")
    ax.set_xlabel("shared PC (dotted: in sample)")
    ax.set_ylabel("r of the two recipes' persona scores")
    k = layer.k
    ax.set_title(f"Which shared PCs every recipe shares, layer {layer.layer}: "
                 f"k_found = {k if k else '0 (no PC shared)'}", fontsize=9)
    fig.legend(loc="outside right center", fontsize=5, frameon=False,
               ncol=1 + len(pairs) // 25)
    return save_figure(fig, path)


def subspace_scatter(coords: dict[str, np.ndarray], layer: int, path: Path,
                     personas: list[str] | None = None) -> Path:
    """``coords[recipe]``: ``[persona, 2]`` on PC1–PC2; lines join one persona across recipes,
    whose name (``personas``, in the rows' order) stands at its mean position."""
    fig, ax = subplots(figsize=(7, 5), layout="constrained")
    recipes = list(coords)
    stacked = np.stack([coords[r] for r in recipes])  # [recipe, persona, 2]
    for p in range(stacked.shape[1]):
        ax.plot(stacked[:, p, 0], stacked[:, p, 1], color="#cccccc", lw=0.5, zorder=1)
    markers = "os^vD<>pP*"
    for i, r in enumerate(recipes):
        ax.scatter(stacked[i, :, 0], stacked[i, :, 1], s=14, marker=markers[i % len(markers)],
                   label=r, zorder=2)
    for name, (x, y) in zip(personas or [], stacked.mean(0), strict=False):
        ax.annotate(name, (x, y), fontsize=5, color="0.25", xytext=(2, 2),
                    textcoords="offset points")
    ax.set_xlabel("shared PC1")
    ax.set_ylabel("shared PC2")
    ax.set_title(f"Personas on the shared PCs, layer {layer}")
    fig.legend(loc="outside right center", fontsize=7, frameon=False)
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


#: What the colour of a patching cell says.
EFFECT_LABEL = "effect (0 = corrupt run, 1 = clean run)"


def patching_heatmap(cells: list[Any], rows: list[str], layers: list[int], title: str,
                     path: Path) -> Path:
    """Two panels (KL and logit-difference effect): positions × layers, 0 = corrupt, 1 = clean,
    one colour bar for both. ``cells``: :class:`~tlpersona.interventions.patching.CellEffect` of
    one method and component."""
    fig, axes = subplots(1, 2, figsize=(3.0 + 1.6 * len(layers), 1.4 + 0.3 * len(rows)),
                         squeeze=False, layout="constrained")
    im = None
    for k, (ax, key, name) in enumerate(zip(axes[0], ("kl_effect", "ld_effect"),
                                            ("KL effect", "logit-difference effect"), strict=True)):
        grid = np.full((len(rows), len(layers)), np.nan)
        for c in cells:
            grid[rows.index(c.position), layers.index(c.layer)] = getattr(c, key)
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(layers)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(layers)), [f"L{x}" for x in layers], fontsize=7)
        # the rows are the same in both panels: named once, on the left
        ax.set_yticks(range(len(rows)), rows if k == 0 else [], fontsize=7)
        ax.set_title(f"{name}\n({title})", fontsize=9)
    assert im is not None
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label=EFFECT_LABEL)
    return save_figure(fig, path)


def head_heatmap(cells: list[Any], layers: list[int], n_heads: int, title: str, path: Path,
                 panels: int = 6) -> Path:
    """KL effect of each head (layers × heads), one panel per position: the ``panels``
    positions whose largest absolute effect is largest; one colour bar for all."""
    by_pos: dict[str, np.ndarray] = {}
    for c in cells:
        grid = by_pos.setdefault(c.position, np.full((len(layers), n_heads), np.nan))
        grid[layers.index(c.layer), c.head] = c.kl_effect
    top = sorted(by_pos, key=lambda p: -np.nanmax(np.abs(by_pos[p]), initial=0.0))[:panels]
    ncols = min(3, max(1, len(top)))
    nrows = -(-max(1, len(top)) // ncols)
    fig, axes = subplots(nrows, ncols, squeeze=False, layout="constrained",
                         figsize=(1.8 + (1.0 + 0.18 * n_heads) * ncols,
                                  0.8 + (0.9 + 0.25 * len(layers)) * nrows))
    step = max(1, n_heads // 8)  # whole head numbers, at most about eight of them
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(top):
            ax.set_visible(False)
            continue
        im = ax.imshow(by_pos[top[k]], cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(0, n_heads, step))
        ax.tick_params(labelsize=6)
        ax.set_xlabel("head", fontsize=7)
        ax.set_yticks(range(len(layers)), [f"L{x}" for x in layers] if k % ncols == 0 else [],
                      fontsize=6)
        ax.set_title(top[k], fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="KL " + EFFECT_LABEL)
    fig.suptitle(f"KL effect per head ({title})", fontsize=9)
    return save_figure(fig, path)
