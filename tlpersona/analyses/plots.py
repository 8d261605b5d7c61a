"""Figures for the comparison report (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tlpersona.analyses import metrics as M  # noqa: E402

_VERDICT_CODE = {"KILL": 0, "GREY": 1, "PASS": 2}


def _pair_name(pair: list[str]) -> str:
    return f"{pair[0]} ~ {pair[1]}"


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def verdict_heatmap(result: dict[str, Any], path: Path) -> Path:
    pairs = list(dict.fromkeys(_pair_name(c["pair"]) for c in result["cells"]))
    layers = result["layers"]
    grid = np.full((len(pairs), len(layers)), np.nan)
    for c in result["cells"]:
        grid[pairs.index(_pair_name(c["pair"])), layers.index(c["layer"])] = _VERDICT_CODE[c["verdict"]]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(layers), 0.8 + 0.35 * len(pairs)))
    cmap = matplotlib.colors.ListedColormap(["#d9534f", "#bbbbbb", "#5cb85c"])
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, aspect="auto")
    names = {v: k for k, v in _VERDICT_CODE.items()}
    for i in range(len(pairs)):
        for j in range(len(layers)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, names[int(grid[i, j])], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(layers)), [f"L{x}" for x in layers])
    ax.set_yticks(range(len(pairs)), pairs, fontsize=7)
    ax.set_title("Verdict per recipe pair and layer")
    return _save(fig, path)


def cosine_violins(result: dict[str, Any], layer: int, path: Path) -> Path:
    cells = [c for c in result["cells"] if c["layer"] == layer]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cells)), 4))
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
    return _save(fig, path)


def matrix_bars(result: dict[str, Any], layer: int, path: Path) -> Path:
    cells = [c for c in result["cells"] if c["layer"] == layer]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cells)), 4))
    x = np.arange(len(cells))
    ax.bar(x - 0.2, [c["matrix_raw"]["pearson"] for c in cells], 0.4, label="raw r")
    ax.bar(x + 0.2, [c["matrix_mc"]["pearson"] for c in cells], 0.4, label="mean-centred r")
    floors = []
    for c in cells:
        vals = [result["noise_floor"].get(p, {}).get(str(layer), {}) for p in c["pair"]]
        rs = [v["matrix_mc_pearson_mean"] for v in vals if v.get("exact") is False]
        floors.append(min(rs) if rs else np.nan)
    ax.scatter(x + 0.2, floors, color="k", marker="_", s=200, zorder=3,
               label="split-half floor (noisier recipe)")
    ax.axhline(result["thresholds"]["pass_mc_r"], color="#5cb85c", lw=0.8, ls="--")
    ax.set_xticks(x, [_pair_name(c["pair"]) for c in cells], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("Pearson r of cosine matrices")
    ax.set_title(f"Inter-persona matrix agreement, layer {layer}")
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def cosine_matrices(source: Any, positions: list[str], layer: int, path: Path) -> Path:
    li = source.layer_index(layer)
    fig, axes = plt.subplots(1, len(positions), figsize=(2.6 * len(positions), 2.8))
    axes = np.atleast_1d(axes)
    for ax, pos in zip(axes, positions, strict=True):
        m = M.cos_matrix(M.mean_centre(source.centroids(pos)[:, li].double().numpy()))
        ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(pos, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Mean-centred inter-persona cosine matrices, layer {layer}", fontsize=9)
    return _save(fig, path)
