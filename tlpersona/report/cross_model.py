"""Markdown, CSV and the figure of a cross-model comparison (no model, no store)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from matplotlib.artist import Artist
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tlpersona.analyses.cross_model import CrossCell, CrossModelResult, StoreSide
from tlpersona.infra.files import atomic_write_bytes, json_bytes
from tlpersona.report.plots import save_figure, subplots
from tlpersona.report.section import Section, write_section
from tlpersona.report.tables import write_csv

#: Bar colour per call.
CALL_COLOURS = {"agree": "#5cb85c", "differ": "#d9534f", "cannot tell": "#bbbbbb"}
FIGURE = "figures/cross_model.png"


def _f(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _p(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}" if v >= 1e-4 else f"{v:.1e}"


def store_line(s: StoreSide) -> str:
    """``A: runs/base — model Qwen/Qwen2.5-7B (hub:…), d_model 3584, 28 blocks, manifest 1a2b…``"""
    ident = f" ({s.model_identity})" if s.model_identity and s.model_identity != s.model else ""
    depth = f", {s.n_layers_total} blocks" if s.n_layers_total is not None else ""
    return (f"{s.label}: `{s.path}` — model {s.model or 'not recorded'}{ident}, d_model "
            f"{s.d_model}{depth}, dtype {s.dtype or 'n/a'}, manifest {s.manifest_hash[:12]}")


def first_screen(res: CrossModelResult) -> list[str]:
    """The answer first: one line, one sentence per recipe, the two stores, what limits it,
    the run in one line and the figure; every number is in details.md and cells.csv."""
    auto = " (sized to the family)" if res.permutations_auto else ""
    pairs = ", ".join(f"L{x}~L{y}" for x, y in res.layer_pairs)
    return [
        "# Cross-model comparison", "",
        f"**{res.answer}**", "",
        *[f"- {r.sentence}" for r in res.recipe_answers], "",
        f"- {store_line(res.a)}", f"- {store_line(res.b)}", "",
        *[f"- {n}" for n in res.notes], "",
        f"{len(res.personas)} personas, {res.n_questions} questions, {len(res.recipes)} "
        f"recipe(s) at layer pairs {pairs} ({res.layer_pairing}): {len(res.cells)} cells; "
        f"{res.n_permutations} Mantel permutations{auto}, smallest reachable Holm p "
        f"{_p(res.min_attainable_p_holm)}; {res.n_null} relabelled Procrustes draws; "
        f"{res.n_splits} question splits; seed {res.seed}; tlpersona {res.code_version}.", "",
        f"![mean-centred r and held-out Procrustes per cell]({FIGURE})", "",
        "Every cell's numbers: [details.md](details.md) and [cells.csv](cells.csv) (one row per "
        "recipe × layer pair); everything: cross_model.json.", "",
    ]


def details(res: CrossModelResult) -> list[str]:
    rows = ["| recipe | layers A~B | mc r (null p95; ceiling) | sampling SD | Mantel p (Holm) "
            "| below ceiling p (Holm) | raw r (null p95) | held-out Procrustes (null p95; ceiling) "
            "| Procrustes p | CKA linear / debiased (null p95; ceiling), for comparability "
            "| spread ρ | call |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in res.cells:
        proc_p = _p(c.procrustes_p) + (f" ({_p(c.procrustes_p_holm)})"
                                       if c.procrustes_p_holm is not None else "")
        rows.append(
            f"| {c.recipe} | {c.layers} | {_f(c.mc_r)} ({_f(c.mc_r_null_p95)}; "
            f"{_f(c.mc_r_ceiling)}) | {_f(c.mc_r_sd)} | {_p(c.mc_r_p)} ({_p(c.mc_r_p_holm)}) "
            f"| {_p(c.mc_r_gap_p)} ({_p(c.mc_r_gap_p_holm)}) "
            f"| {_f(c.raw_r)} ({_f(c.raw_r_null_p95)}) "
            f"| {_f(c.procrustes_cos)} ({_f(c.procrustes_null_p95)}; {_f(c.procrustes_ceiling)}) "
            f"| {proc_p} "
            f"| {_f(c.cka_linear)} ({_f(c.cka_linear_null_p95)}; {_f(c.cka_linear_ceiling)}) / "
            f"{_f(c.cka_debiased)} ({_f(c.cka_debiased_null_p95)}; {_f(c.cka_debiased_ceiling)}) "
            f"| {_f(c.spread_spearman)} | **{c.call}** |")
    corrected = ("Holm-adjusted over every cell" if res.procrustes_corrected else
                 "uncorrected: an effect size beside its null, too few draws for Holm")
    return [
        "# Cross-model comparison: every cell", "",
        f"A = {res.a.name}, B = {res.b.name}. Null: B's persona labels shuffled "
        f"({res.n_permutations} Mantel permutations, the same draws for CKA; {res.n_null} "
        "relabelled reruns for the held-out Procrustes cosine). Ceiling: the geometric mean of "
        "the two stores' split-half values, Spearman–Brown corrected to full size (1 for a "
        "question-invariant recipe). Sampling SD: the delete-half jackknife over the question "
        "splits, both stores on the same half.", "",
        "\n".join(rows), "",
        f"Procrustes p: {corrected}. {res.left_out}", "",
        *[f"- {r.recipe}: " + "; ".join(f"{c.layers} {c.reason}" for c in res.cells
                                         if c.recipe == r.recipe) for r in res.recipe_answers],
        "",
    ]


def _label(c: CrossCell, several_recipes: bool, rotated: bool) -> str:
    # rotated labels stay on one line: two-line labels at an angle run into their neighbours
    return (f"{c.recipe}{' ' if rotated else chr(10)}{c.layers}" if several_recipes
            else c.layers)


def figure(res: CrossModelResult, path: Path) -> Path:
    """Two panels, one bar per cell coloured by its call: the mean-centred matrix r and the
    held-out Procrustes cosine, each with its null's 95th percentile and its ceiling."""
    cells = res.cells
    several = len(res.recipes) > 1
    x = np.arange(len(cells))
    fig, axes = subplots(1, 2, figsize=(max(7.0, 1.2 + 0.75 * len(cells)), 4.2),
                         layout="constrained")
    panels = [("mean-centred matrix r", [c.mc_r for c in cells],
               [c.mc_r_null_p95 for c in cells], [c.mc_r_ceiling for c in cells]),
              ("held-out Procrustes cosine", [c.procrustes_cos for c in cells],
               [c.procrustes_null_p95 for c in cells], [c.procrustes_ceiling for c in cells])]
    for ax, (title, vals, nulls, ceils) in zip(axes, panels, strict=True):
        def arr(v: list[float | None]) -> np.ndarray:
            return np.array([np.nan if a is None else a for a in v], dtype=float)

        ax.bar(x, np.nan_to_num(arr(vals)), 0.7, color=[CALL_COLOURS[c.call] for c in cells])
        ax.scatter(x, arr(ceils), color="k", marker="_", s=260, zorder=3)
        ax.scatter(x, arr(nulls), color="#1f4e9c", marker="_", s=260, zorder=3)
        ax.axhline(0, color="0.3", lw=0.6)
        lo = min(0.0, float(np.nanmin(np.concatenate([arr(vals), arr(nulls), [0.0]]))))
        ax.set_ylim(lo - 0.05, 1.08)
        rotated = len(cells) > 6
        ax.set_xticks(x, [_label(c, several, rotated) for c in cells],
                      rotation=60 if rotated else 0, ha="right" if rotated else "center",
                      rotation_mode="anchor", fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("Pearson r of the persona × persona matrices", fontsize=8)
    axes[1].set_ylabel("cosine on held-out personas", fontsize=8)
    fig.suptitle(f"A: {_short(res.a.name)}  vs  B: {_short(res.b.name)} (bars coloured by call)",
                 fontsize=9)
    handles: list[Artist] = [Patch(color=CALL_COLOURS[k], label=k) for k in CALL_COLOURS
               if any(c.call == k for c in cells)]
    handles += [Line2D([], [], color="k", marker="_", ls="", ms=14,
                       label="ceiling (split-half, geometric mean of A and B)"),
                Line2D([], [], color="#1f4e9c", marker="_", ls="", ms=14,
                       label="null: 95th percentile, B's personas shuffled")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)),
               fontsize=7, frameon=False)
    return save_figure(fig, path)


def _short(name: str, n: int = 40) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def write_cross_model(res: CrossModelResult, out: Path) -> Section:
    """cross_model.json, cells.csv, the figure, details.md and report.md into ``out``; returns
    them as report.md's :class:`~tlpersona.report.section.Section`."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "cross_model.json", json_bytes(res.to_dict()))
    files = [out / "cross_model.json",
             write_csv([{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
                        for c in res.cells], out / "cells.csv"),
             figure(res, out / FIGURE)]
    atomic_write_bytes(out / "details.md", "\n".join(details(res)).encode())
    files.append(out / "details.md")
    return write_section(out / "report.md", "\n".join(first_screen(res)), files)
