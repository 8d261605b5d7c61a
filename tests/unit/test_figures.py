"""Figures: every legend outside the plotted area, no tick labels over each other, every mark
inside its axes, a scale where colour carries a number."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def _captured(monkeypatch, module, name: str) -> list:
    """Figures passed to ``module.name`` (the save function), still saved."""
    figs: list = []
    real = getattr(module, name)

    def keep(fig, path):
        figs.append(fig)
        return real(fig, path)

    monkeypatch.setattr(module, name, keep)
    return figs


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _labels_overlap(a, b, renderer, dpi: float) -> bool:
    """Neighbouring tick labels: upright ones by their boxes; labels rotated by the same angle
    are parallel bands whose distance across them (their offset along the axis times the sine
    of the angle) must hold a band's thickness (its lines at the font size)."""
    angle = np.radians(a.get_rotation())
    if not np.sin(angle):
        return _overlap(a.get_window_extent(renderer), b.get_window_extent(renderer))
    thick = max(a.get_text().count("\n") + 1, 1) * a.get_fontsize() * 1.2 * dpi / 72
    dx = abs(b.get_window_extent(renderer).x1 - a.get_window_extent(renderer).x1)
    return dx * abs(np.sin(angle)) < thick


def layout_problems(fig) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    plotted = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    legends = [*fig.legends, *(ax.get_legend() for ax in plotted if ax.get_legend())]
    out = []
    for leg in legends:
        box = leg.get_window_extent(renderer)
        out += [f"legend over the axes {ax.get_title()!r}" for ax in plotted
                if _overlap(box, ax.get_window_extent(renderer))]
    titles = [(ax.title.get_text(), ax.title.get_window_extent(renderer)) for ax in plotted
              if ax.title.get_text()]
    out += [f"titles {a!r} and {b!r} overlap" for i, (a, ba) in enumerate(titles)
            for b, bb in titles[i + 1:] if _overlap(ba, bb)]
    for ax in plotted:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        for a, b in zip(labels, labels[1:], strict=False):
            if _labels_overlap(a, b, renderer, fig.dpi):
                out.append(f"tick labels {a.get_text()!r} and {b.get_text()!r} overlap")
        lo, hi = ax.get_ylim()
        for line in ax.get_lines():
            y = np.asarray(line.get_ydata(), dtype=float)
            if line.get_marker() == "*" and np.any((y < lo) | (y > hi)):
                out.append(f"a star mark outside {ax.get_title()!r}")
    return out


def _steering_like():
    import test_steer_null as T

    from tlpersona.interventions.steering.config import Setting
    from tlpersona.interventions.steering.result import CurvePoint

    recipes = ["last", "sys_end", "prompt_mean", "prompt_mean_no_first", "response_mean",
               "response_mean_seed", "raw_system_last", "sys_end+1"]
    scores = []
    for op in ("add", "ablate", "cap"):
        for k, r in enumerate(recipes):
            s = T._score(r, 0.6 - 0.08 * k, list(T.DEFAULT_POOL), (0.2, 0.1, 0.3))
            s.operator = op
            s.setting = Setting(op, (15,) if op == "add" else (7, 15),
                                50.0 if op == "cap" else 0.125)
            if op == "cap":
                s.curve = [CurvePoint(p, 0.1 + 0.001 * p, 0.1) for p in (10, 25, 50, 75, 90)]
            scores.append(s)
    res = T._result(scores[:8])
    res.scores, res.recipes = scores, recipes
    res.config.operators = ["add", "ablate", "cap"]
    return res


def test_steering_figures_keep_labels_and_legends_clear(monkeypatch, tmp_path):
    import tlpersona.report.steering as R

    figs = _captured(monkeypatch, R, "_save")
    res = _steering_like()
    R.effects_figure(res, tmp_path / "e.png")
    R.curves_figure(res, tmp_path / "c.png")
    effects, curves = figs
    assert layout_problems(effects) == [] and layout_problems(curves) == []
    assert effects.get_size_inches()[0] < 12  # one row per operator, not 24 panels' width
    # one colour per recipe, the same in every panel
    by_panel = [{ln.get_label(): ln.get_color() for ln in ax.get_lines()
                 if not ln.get_label().startswith("_")} for ax in curves.axes]
    assert by_panel[0] == by_panel[1] and len(set(by_panel[0].values())) == 8


def _compare_like(n_pairs: int = 28) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    cells = [SimpleNamespace(pair=(f"recipe_{i}", f"other_recipe_{i}"), layer=15, verdict="KILL",
                             per_persona_cos_all=list(rng.uniform(0.5, 1, 26)),
                             matrix_raw=SimpleNamespace(pearson=float(rng.uniform(0, 1))),
                             matrix_mc=SimpleNamespace(pearson=float(rng.uniform(0, 1)), null_p95=0.1),
                             ceiling=SimpleNamespace(matrix_mc_pearson=0.95)) for i in range(n_pairs)]
    return SimpleNamespace(cells=cells, layers=[15], thresholds=SimpleNamespace(
        pass_min_cos=0.95, kill_min_cos=0.85, pass_mc_r=0.9))


def _subspace_like(n_pairs: int = 28) -> SimpleNamespace:
    rng = np.random.default_rng(1)
    pairs = [f"r{i}~s{i}" for i in range(n_pairs)]

    def rows():
        return [SimpleNamespace(pc=k, pairs={p: float(rng.uniform(-0.5, 1)) for p in pairs})
                for k in range(1, 13)]

    return SimpleNamespace(
        layer=15, k=None, per_pc=rows(), per_pc_in_sample=rows(), per_pc_threshold=[0.3] * 12,
        variance={f"recipe_{i}": SimpleNamespace(shared_cumulative=list(np.linspace(0.1, 0.9, 50)),
                                                 own_cumulative=list(np.linspace(0.3, 1, 25)))
                  for i in range(8)})


def test_compare_and_subspace_figures_keep_labels_and_legends_clear(monkeypatch, tmp_path):
    import torch

    from tlpersona.report import plots

    figs = _captured(monkeypatch, plots, "save_figure")
    cmp, sub = _compare_like(), _subspace_like()
    plots.cosine_violins(cmp, 15, tmp_path / "v.png")
    plots.matrix_bars(cmp, 15, tmp_path / "m.png")
    plots.subspace_variance(sub, tmp_path / "sv.png")
    plots.subspace_agreement(sub, SimpleNamespace(min_r=0.5), tmp_path / "sa.png")
    coords = {f"recipe_{i}": np.random.default_rng(i).normal(size=(26, 2)) for i in range(8)}
    names = [f"persona_{i}" for i in range(26)]
    plots.subspace_scatter(coords, 15, tmp_path / "sc.png", names)
    from tlpersona.analyses import metrics as M

    matrices = {f"recipe_{i}": M.cos_matrix(M.mean_centre(torch.randn(26, 16).double().numpy()))
                for i in range(8)}
    plots.cosine_matrices(matrices, names, 15, tmp_path / "cm.png")
    for fig in figs:
        assert layout_problems(fig) == [], fig.axes[0].get_title()
    violins, bars, variance, agreement, scatter, matrices = figs
    # 28 pairs: 28 colours (a 10-colour cycle gave the eleventh pair the first one's)
    colours = {ln.get_color() if isinstance(ln.get_color(), str) else tuple(ln.get_color())
               for ln in agreement.axes[0].get_lines() if not ln.get_label().startswith("_")}
    assert len(colours) == 28 + 1  # and the black "needed" step
    assert "k_found = 0 (no PC shared)" in agreement.axes[0].get_title()
    assert {t.get_text() for t in scatter.axes[0].texts} == set(names)
    # a colour scale, and the persona order named
    assert any(ax.get_label() == "<colorbar>" and "cosine" in ax.get_ylabel()
               for ax in matrices.axes)
    assert [t.get_text() for t in matrices.axes[0].get_yticklabels()] == names


def test_patching_figures_keep_titles_apart_with_one_labelled_scale(monkeypatch, tmp_path):
    from tlpersona.report import plots

    figs = _captured(monkeypatch, plots, "save_figure")
    rows = ["sys_start", *(f"sys_start+{i}" for i in range(1, 8)), "sys_end", "last"]
    layers = [4, 12]
    rng = np.random.default_rng(2)
    cells = [SimpleNamespace(position=r, layer=la, head=h, kl_effect=float(rng.uniform(-1, 1)),
                             ld_effect=float(rng.uniform(-1, 1)))
             for r in rows for la in layers for h in range(9)]
    plots.patching_heatmap([c for c in cells if c.head == 0], rows, layers,
                           "attribution, attn_out", tmp_path / "p.png")
    plots.head_heatmap(cells, layers, 9, "attribution, head", tmp_path / "h.png")
    grid, heads = figs
    for fig in figs:
        assert layout_problems(fig) == []
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 1 and "0 = corrupt run, 1 = clean run" in bars[0].get_ylabel()
    # heads are whole numbers
    ticks = [t for ax in heads.axes if ax.get_label() != "<colorbar>" and ax.get_visible()
             for t in ax.get_xticks()]
    assert ticks and all(float(t).is_integer() for t in ticks)
