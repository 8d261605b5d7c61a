"""Markdown and figures for a :class:`~tlpersona.interventions.steering.SteeringResult`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.artist import Artist
from matplotlib.figure import Figure

from tlpersona.infra.files import atomic_write_with
from tlpersona.interventions.steering import SteeringResult
from tlpersona.interventions.steering.bootstrap import Estimate
from tlpersona.interventions.steering.config import GOAL
from tlpersona.interventions.steering.result import RecipeScore
from tlpersona.interventions.steering.verdict import monotone_floor
from tlpersona.report.plots import subplots
from tlpersona.report.section import Section, write_section

HOW = {
    "add": "`alpha · s_l · v/|v|` added to the base run after its system block (alpha in units "
           "of the layer's typical residual norm `s_l`); goal: the persona's distributions",
    "ablate": "`v/|v|` projected out of the persona's run from its system text on (one layer, "
              "or every steered layer together); goal: the base persona's distributions",
    "cap": "projection onto the base persona's axis raised to the p-th percentile of the stored "
           "personas' projections, on the persona's run (the Assistant-Axis capping); goal: the "
           "base persona's distributions",
}


_TEST = {"t": "t-prediction", "rank": "rank"}


def _e(x: Estimate | None, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if not np.isfinite(x.lo):
        return f"{x.mean:.{nd}f}"
    return f"{x.mean:.{nd}f} [{x.lo:.{nd}f}, {x.hi:.{nd}f}]"


def effects_figure(result: SteeringResult, path: Path) -> Path:
    """One row per operator: the own vector's effect with its interval, each random
    direction's effect as a dot with the 95 % prediction band of one more direction (the
    t-prediction's), and the other personas' vectors' effect with its interval (scoring
    questions). The dots, not an interval of their mean, are what the own vector is tested
    against. One legend for every row, above them, where it covers no point."""
    from scipy import stats

    ops = list(result.config.operators)
    n = max(len(result.scores_for(op)) for op in ops)
    fig, axes = subplots(len(ops), 1, figsize=(2.5 + 0.8 * n, 0.9 + 2.6 * len(ops)),
                         squeeze=False, layout="constrained")
    for ax, op in zip(axes[:, 0], ops, strict=True):
        scores = result.scores_for(op)
        x = np.arange(len(scores))
        for i, s in enumerate(scores):
            r = np.asarray(s.random_effects, dtype=float)
            jitter = np.linspace(-0.07, 0.07, r.size) if r.size > 1 else np.zeros(1)
            ax.plot(i + jitter, r, "o", ms=2.5, color="0.55", alpha=0.8,
                    label="random directions (each)" if i == 0 else None)
            if r.size >= 3 and r.std(ddof=1) > 0:
                half = stats.t.isf(0.025, r.size - 1) * r.std(ddof=1) * np.sqrt(1 + 1 / r.size)
                ax.vlines(i, r.mean() - half, r.mean() + half, color="0.55", lw=4, alpha=0.25,
                          label="95% prediction band, one direction" if i == 0 else None)
        arms = [("own vector", lambda s: s.own.effect, "C0", -0.22),
                ("other personas' vectors", lambda s: s.other.effect if s.other else None, "C3", 0.22)]
        for name, get, color, dx in arms:
            pts = [(i, get(s)) for i, s in enumerate(scores) if get(s) is not None]
            if not pts:
                continue
            xs = np.array([i for i, _ in pts]) + dx
            m = np.array([e.mean for _, e in pts])
            lo = np.array([e.lo for _, e in pts])
            hi = np.array([e.hi for _, e in pts])
            ax.errorbar(xs, m, yerr=[m - lo, hi - m], fmt="o", ms=4, color=color, capsize=2,
                        label=name)
        beyond = [(i - 0.22, s.own.effect.hi) for i, s in enumerate(scores) if s.beats_random]
        if beyond:
            # a marker, not a text: the axes' limits grow to hold it
            bx, by = zip(*beyond, strict=True)
            ax.plot(bx, by, marker="*", ls="none", ms=8, color="k", zorder=4,
                    label="own vector beyond random after Holm")
        ax.margins(y=0.12)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x, [f"{s.recipe}\n{s.setting.label()}" for s in scores], fontsize=7,
                      rotation=30, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, max(len(scores), 1) - 0.4)
        ax.set_ylabel("effect (1 - KL/KL0)", fontsize=8)
        ax.set_title(f"{op}: {GOAL[op]}, scoring questions", fontsize=9)
    handles: dict[str, Artist] = {}
    for ax in axes[:, 0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside upper center",
               ncol=min(3, len(handles)), fontsize=7, frameon=False)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    """Write ``path``; the figure is laid out by its constrained layout (the legends outside
    the axes included) and the saved area grows to hold every label and title."""
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png",
                                                    bbox_inches="tight", pad_inches=0.1))
    return path


def curves_figure(result: SteeringResult, path: Path) -> Path:
    """Effect against strength at the selected layers (own vector, selection questions); one
    colour per recipe in every panel, named in one legend beside the panels."""
    ops = [op for op in result.config.operators if op != "ablate"]
    fig, axes = subplots(1, max(1, len(ops)), figsize=(1.5 + 3.6 * max(1, len(ops)), 3.4),
                         squeeze=False, layout="constrained")
    colour = {r: f"C{i % 10}" for i, r in enumerate(result.recipes)}
    for ax, op in zip(axes[0], ops, strict=False):
        for s in result.scores_for(op):
            xs = [p.strength for p in s.curve]
            ax.plot(xs, [p.effect for p in s.curve], marker="o", ms=3, color=colour[s.recipe],
                    label=s.recipe)
            ax.plot([s.setting.strength], [next(p.effect for p in s.curve
                                                if p.strength == s.setting.strength)],
                    marker="*", ms=10, color=colour[s.recipe])
        if op == "add":
            ax.set_xscale("log", base=2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("alpha (× typical residual norm)" if op == "add" else "cap percentile")
        ax.set_ylabel("effect")
        ax.set_title(f"{op} at the selected layer, selection questions\n"
                     "(star: selected strength)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=7, frameon=False)
    return _save(fig, path)


def _beyond_words(test: str, n: int) -> str:
    if test == "t":
        return (f"a one-sided t-prediction test of the own effect against the {n} random "
                "directions' effects, p = 1 − T_{k−1}((own − mean) / (sd · √(1 + 1/k))): "
                "parametric: exact when their effects are normal, conservative when they are "
                "left-skewed (a random push helps less than it can hurt), anti-conservative when "
                "right-skewed or heavy-tailed; it is used only where their sample skewness is "
                "≤ 0 (a screen, not a guarantee: heavy-tailed pools pass it), and elsewhere the "
                "exact rank p = (1 + #directions ≥ own) / (directions + 1) decides,")
    return (f"the own effect's rank among the {n} random directions' effects, p = (1 + "
            "#directions ≥ own) / (directions + 1), exact,")


def _random_cell(s: RecipeScore) -> str:
    r = np.asarray(s.random_effects, dtype=float)
    if not r.size:
        return "n/a"
    sd = f" ± {r.std(ddof=1):.3f}" if r.size > 1 else ""
    skew = f"; skew {s.random_skew:+.2f}" if s.random_skew is not None else ""
    return f"{r.mean():.3f}{sd} ({r.min():.3f} to {r.max():.3f}{skew})"


def write_steering(result: SteeringResult, out: str | Path) -> Section:
    """Write ``steering.json``, figures and ``steering.md`` into ``out``; return them as its
    :class:`~tlpersona.report.section.Section`."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    files = [result.write_json(out / "steering.json"),
             effects_figure(result, figs / "steering_effects.png"),
             curves_figure(result, figs / "steering_curves.png")]
    cfg = result.config
    ch = result.personas
    lines = [
        "## Steering: which recipe's vector is causally the persona", "",
        f"**{result.answer()}**", "",
        f"Base persona {result.base!r}; target personas {', '.join(ch.names)} — {ch.reason}. "
        f"Settings selected on questions {', '.join(result.selection_questions)}; every number "
        f"below is scored on the other questions {', '.join(result.scoring_questions)} only. "
        + (result.questions_note + " " if result.questions_note else "")
        + f"Responses: {cfg.response_tokens} greedy tokens, teacher-forced. Effect = "
        "1 - ΣKL(goal || edited) / ΣKL(goal || unedited) over (persona, question) examples, KL "
        "averaged over the last prompt token and the response tokens. Intervals: "
        f"{cfg.level:.0%} bootstrap over questions ({cfg.n_boot} draws; the random-direction "
        f"control over its {cfg.n_random} directions too); with "
        f"{len(result.scoring_questions)} scoring questions they are rough and, if anything, too "
        "narrow, so no claim below rests on them: ranks come from sign-flip tests over the "
        "scoring questions (Holm over recipe pairs), and \"beyond random\" from "
        + _beyond_words(cfg.random_test, cfg.n_random) + " Holm-adjusted over every recipe × "
        "operator (shown: Holm p; the exact rank p over the directions is in steering.json as "
        "`random_p`). "
        "\"wrong way\": fraction of examples whose KL to the goal grew. Fluency: mean per-token "
        "log-prob change of the base response (for `add`, relative to the persona's own run; "
        f"a setting below -{cfg.fluency_margin:g} nats/token cannot beat the controls). Typical "
        "residual norms: " + ", ".join(f"L{k} {v:.1f}" for k, v in result.typical_norm.items())
        + ".", "",
    ]
    for op in cfg.operators:
        scores = result.scores_for(op)
        lines += [f"### {op}", "", HOW[op] + ".", "", f"**{result.verdicts[op]}**", "",
                  "| rank | recipe | setting | interior | own effect | random dirs (mean ± sd; range) | "
                  "other personas | specificity | log-prob gain (own / other) | wrong way | "
                  "fluency | beyond random (Holm p) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in scores:
            interior = {None: "", True: "yes", False: "**edge**"}[s.interior]
            flu = _e(s.fluency, 2) + ("" if s.fluency_ok else " **fails**")
            lines.append(
                f"| {s.rank} | {s.recipe} | {s.setting.label()} | {interior} | {_e(s.own.effect)} "
                f"| {_random_cell(s)} | {_e(s.other.effect if s.other else None)} | "
                f"{_e(s.specificity)} | {_e(s.own.lp_gain)} / "
                f"{_e(s.other.lp_gain if s.other else None)} | {s.own.wrong_way:.0%} | {flu} | "
                f"{'yes' if s.beats_random else 'no'} ({s.random_p_holm:.3g}, {_TEST[s.random_test]}) |")
        edge = [s.recipe for s in scores if s.interior is False]
        if edge:
            lines += ["", f"Selected strength at the edge of the grid for {', '.join(edge)}: the "
                          "optimum may lie outside it."]
        rhos = [f"{s.recipe} {s.monotone_rho:.2f} (p = {s.monotone_p:.3f})" for s in scores
                if s.monotone_rho is not None and s.monotone_p is not None]
        if rhos:
            n_str = max(len(s.curve) for s in scores)
            floor = monotone_floor(n_str)
            cannot = (f" With {n_str} strengths the exact p cannot fall below {floor:.3f}, so "
                      f"this line cannot show monotonicity at {1 - cfg.level:g} (5 strengths: "
                      f"{monotone_floor(5):.3f})." if floor >= 1 - cfg.level else "")
            lines += ["", "Monotonicity (Spearman ρ of the log-prob gain against strength at the "
                          "selected layers, selection questions; p: every ordering of the "
                          "strengths, two-sided, per recipe): " + ", ".join(rhos) + "." + cannot]
        lines.append("")
    lines += ["![steering effects](figures/steering_effects.png)", "",
              "![steering curves](figures/steering_curves.png)", ""]
    if result.continuations:
        lines += ["Continuations (an illustration, not evidence: the `add` recipe with the "
                  "largest effect on the selection questions, on a scoring question):", ""]
    for c in result.continuations:
        fl = {k: f"{v:.2f}" for k, v in c.base_logprob.items()}
        lines += [f"**{c.persona}** ({c.recipe}, {c.setting}) — {c.question}", "",
                  f"* base: {c.base!r} (log-prob/token under the base model {fl['base']})",
                  f"* steered: {c.steered!r} ({fl['steered']})",
                  f"* random direction: {c.random!r} ({fl['random']})",
                  f"* the persona itself: {c.persona_itself!r} ({fl['persona_itself']})", ""]
    return write_section(out / "steering.md", "\n".join(lines), files)
