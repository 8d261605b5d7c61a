"""The selection phase of a steering run: the seeded split of the questions into selection and
scoring ones, each operator's candidate settings, and per operator × recipe the setting with the
largest own-vector effect on the selection questions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tlpersona.data import Question
from tlpersona.errors import TlpersonaError
from tlpersona.interventions.steering.config import Setting, SteerConfig
from tlpersona.interventions.steering.evaluate import Evaluator, Plan, kl_effect, own_directions
from tlpersona.interventions.steering.result import CurvePoint


def split_questions(questions: list[Question], seed: int) -> tuple[list[Question], list[Question]]:
    """Seeded split: the first ``n // 2`` of a permutation select, the rest are scored."""
    if len(questions) < 2:
        raise TlpersonaError("steering needs at least two questions (some to select the "
                             "setting on, others to score it on)")
    order = np.random.default_rng(seed).permutation(len(questions))
    k = len(questions) // 2
    return [questions[i] for i in order[:k]], [questions[i] for i in order[k:]]


def _settings(cfg: SteerConfig, op: str, layers: list[int]) -> list[Setting]:
    singles = [(la,) for la in layers]
    if op == "add":
        return [Setting(op, ls, float(a)) for ls in singles for a in sorted(cfg.alphas)]
    spans = singles + ([tuple(layers)] if len(layers) > 1 else [])
    if op == "ablate":
        return [Setting(op, ls, 1.0) for ls in spans]
    return [Setting(op, ls, float(p)) for ls in spans for p in sorted(cfg.cap_percentiles)]


@dataclass(frozen=True)
class Chosen:
    """The setting selected for one operator × recipe on the selection questions: its
    own-vector effect there, whether its strength lies strictly inside the grid (None: no
    grid, ``ablate``), and the effect-against-strength curve at its layers."""

    setting: Setting
    effect: float
    interior: bool | None
    curve: list[CurvePoint]


def select_settings(ev: Evaluator, questions: list[Question]) -> dict[tuple[str, str], Chosen]:
    """Per (operator, recipe), in operator-then-recipe order, the candidate setting with the
    largest own-vector effect on the selection ``questions`` (every target's own vector on
    every question). All candidates' rows are planned first and run in one pass."""
    cfg, nt, own = ev.cfg, len(ev.targets), own_directions(ev)
    plan = Plan()
    cands = {(op, r): _settings(cfg, op, ev.layers) for op in cfg.operators for r in ev.recipes}
    for (_, r), settings in cands.items():
        for s in settings:
            for i in range(nt):
                for q in questions:
                    ev.plan_row(plan, s, r, own[i], i, q, False)
    ev.run(plan, "steering: select")
    chosen: dict[tuple[str, str], Chosen] = {}
    for (op, r), settings in cands.items():
        scored = []
        for s in settings:
            v = np.array([ev.values(s, r, own[i], i, q, plan) for i in range(nt) for q in questions])
            scored.append((s, kl_effect(v), float(v[:, 2].mean())))
        s, eff, _ = max(scored, key=lambda x: x[1])
        grid = [x[0].strength for x in scored if x[0].layers == s.layers]
        interior = None if op == "ablate" else min(grid) < s.strength < max(grid)
        curve = [CurvePoint(x.strength, e, g) for x, e, g in scored if x.layers == s.layers]
        chosen[op, r] = Chosen(s, eff, interior, curve)
    return chosen
