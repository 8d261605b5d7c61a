"""Markdown and figures for a :class:`~tlpersona.interventions.steering.SteeringResult`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlpersona.files import atomic_write_bytes
from tlpersona.interventions.steer_stats import Estimate
from tlpersona.interventions.steering import SteeringResult
from tlpersona.report.plots import save_figure, subplots

HOW = {
    "add": "`alpha · s_l · v/|v|` added to the base run after its system block (alpha in units "
           "of the layer's typical residual norm `s_l`); goal: the persona's distributions",
    "ablate": "`v/|v|` projected out of the persona's run from its system text on (one layer, "
              "or every steered layer together); goal: the base persona's distributions",
    "cap": "projection onto the base persona's axis raised to the p-th percentile of the stored "
           "personas' projections, on the persona's run (the Assistant-Axis capping); goal: the "
           "base persona's distributions",
}


def _e(x: Estimate | None, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if not np.isfinite(x.lo):
        return f"{x.mean:.{nd}f}"
    return f"{x.mean:.{nd}f} [{x.lo:.{nd}f}, {x.hi:.{nd}f}]"


def effects_figure(result: SteeringResult, path: Path) -> Path:
    """One panel per operator: the own vector's effect with its interval, the random
    directions' and the other personas' vectors' (scoring questions)."""
    ops = list(result.config.operators)
    fig, axes = subplots(1, len(ops), figsize=(1.2 + 1.1 * len(result.recipes) * len(ops), 3.4),
                             squeeze=False)
    for ax, op in zip(axes[0], ops, strict=True):
        scores = result.scores_for(op)
        x = np.arange(len(scores))
        arms = [("own vector", lambda s: s.own.effect, "C0", -0.2),
                ("random directions", lambda s: s.random.effect, "0.5", 0.0),
                ("other personas' vectors", lambda s: s.other.effect if s.other else None, "C3", 0.2)]
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
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x, [f"{s.recipe}\n{s.setting.label()}" for s in scores], fontsize=6)
        ax.set_title(f"{op}: effect (1 - KL/KL0), scoring questions", fontsize=8)
    axes[0][0].legend(fontsize=6)
    return save_figure(fig, path)


def curves_figure(result: SteeringResult, path: Path) -> Path:
    """Effect against strength at the selected layers (own vector, selection questions)."""
    ops = [op for op in result.config.operators if op != "ablate"]
    fig, axes = subplots(1, max(1, len(ops)), figsize=(4 * max(1, len(ops)), 3.2),
                             squeeze=False)
    for ax, op in zip(axes[0], ops, strict=False):
        for i, s in enumerate(result.scores_for(op)):
            xs = [p.strength for p in s.curve]
            ax.plot(xs, [p.effect for p in s.curve], marker="o", ms=3, color=f"C{i % 10}",
                    label=f"{s.recipe} ({s.setting.label()})")
            ax.plot([s.setting.strength], [next(p.effect for p in s.curve
                                                if p.strength == s.setting.strength)],
                    marker="*", ms=10, color=f"C{i % 10}")
        if op == "add":
            ax.set_xscale("log", base=2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("alpha (× typical residual norm)" if op == "add" else "cap percentile")
        ax.set_ylabel("effect")
        ax.set_title(f"{op}, selection questions (star: selected)", fontsize=8)
        ax.legend(fontsize=5)
    return save_figure(fig, path)


def write_steering(result: SteeringResult, out: str | Path) -> str:
    """Write ``steering.json``, figures and ``steering.md`` into ``out``; return the markdown."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    result.write_json(out / "steering.json")
    effects_figure(result, figs / "steering_effects.png")
    curves_figure(result, figs / "steering_curves.png")
    cfg = result.config
    ch = result.personas
    lines = [
        "## Steering: which recipe's vector is causally the persona", "",
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
        "scoring questions (Holm over recipe pairs), and \"beyond random\" from the own "
        f"effect's rank among the {cfg.n_random} random directions' effects, p = (1 + #directions "
        "≥ own) / (directions + 1), Holm-adjusted over every recipe × operator (shown: Holm p). "
        "\"wrong way\": fraction of examples whose KL to the goal grew. Fluency: mean per-token "
        "log-prob change of the base response (for `add`, relative to the persona's own run; "
        f"a setting below -{cfg.fluency_margin:g} nats/token cannot beat the controls). Typical "
        "residual norms: " + ", ".join(f"L{k} {v:.1f}" for k, v in result.typical_norm.items())
        + ".", "",
    ]
    for op in cfg.operators:
        scores = result.scores_for(op)
        lines += [f"### {op}", "", HOW[op] + ".", "", f"**{result.verdicts[op]}**", "",
                  "| rank | recipe | setting | interior | own effect | random dirs (mean) | "
                  "other personas | specificity | log-prob gain (own / other) | wrong way | "
                  "fluency | beyond random (Holm p) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in scores:
            interior = {None: "", True: "yes", False: "**edge**"}[s.interior]
            flu = _e(s.fluency, 2) + ("" if s.fluency_ok else " **fails**")
            lines.append(
                f"| {s.rank} | {s.recipe} | {s.setting.label()} | {interior} | {_e(s.own.effect)} "
                f"| {_e(s.random.effect)} | {_e(s.other.effect if s.other else None)} | "
                f"{_e(s.specificity)} | {_e(s.own.lp_gain)} / "
                f"{_e(s.other.lp_gain if s.other else None)} | {s.own.wrong_way:.0%} | {flu} | "
                f"{'yes' if s.beats_random else 'no'} ({s.random_p_holm:.3f}) |")
        edge = [s.recipe for s in scores if s.interior is False]
        if edge:
            lines += ["", f"Selected strength at the edge of the grid for {', '.join(edge)}: the "
                          "optimum may lie outside it."]
        rhos = [f"{s.recipe} {s.monotone_rho:.2f} (p = {s.monotone_p:.3f})" for s in scores
                if s.monotone_rho is not None and s.monotone_p is not None]
        if rhos:
            lines += ["", "Monotonicity (Spearman ρ of the log-prob gain against strength at the "
                          "selected layers, selection questions; p: every ordering of the "
                          "strengths, two-sided, per recipe): " + ", ".join(rhos) + "."]
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
    section = "\n".join(lines)
    atomic_write_bytes(out / "steering.md", section.encode())
    return section
