"""The scoring phase of a steering run: each selected setting on the scoring questions only,
with the own vector, the random directions and the other personas' vectors, bootstrap
intervals, the fluency guard and the beyond-random test (Holm and ranks follow in
:mod:`~tlpersona.interventions.steering.verdict`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tlpersona.data import Question
from tlpersona.interventions.steering.bootstrap import Bootstrap, beyond_random
from tlpersona.interventions.steering.config import Setting
from tlpersona.interventions.steering.evaluate import Evaluator, Plan, kl_effect, own_directions
from tlpersona.interventions.steering.result import Arm, Example, RecipeScore
from tlpersona.interventions.steering.select import Chosen
from tlpersona.interventions.steering.verdict import monotonicity


def score_settings(ev: Evaluator, chosen: dict[tuple[str, str], Chosen], questions: list[Question]
                   ) -> tuple[list[RecipeScore], dict[tuple[str, str], np.ndarray]]:
    """Every chosen setting scored on the scoring ``questions`` only: the own vector (with its
    fluency guard), the random directions and, but for ``cap``, the other targets' vectors,
    with bootstrap intervals and the beyond-random test (before Holm and ranks). Also, per
    (operator, recipe), the own vector's edited KL per scoring question ``[question]`` (what
    the ranks compare). Scores in ``chosen``'s order."""
    cfg = ev.cfg
    plan = Plan()
    for (op, r), c in chosen.items():
        _plan_scoring(ev, plan, op, r, c.setting, questions)
    ev.run(plan, "steering: score")

    boot = Bootstrap(len(questions), cfg.n_boot, cfg.seed, cfg.level)
    dir_w = boot.direction_weights(cfg.n_random)
    scores: list[RecipeScore] = []
    kl_q: dict[tuple[str, str], np.ndarray] = {}  # edited KL per scoring question
    for (op, r), c in chosen.items():
        score, kl_q[op, r] = _score(ev, plan, boot, dir_w, op, r, c, questions)
        scores.append(score)
    return scores, kl_q


def _plan_scoring(ev: Evaluator, plan: Plan, op: str, r: str, s: Setting,
                  questions: list[Question]) -> None:
    """One setting's scoring rows, per target and question: own, random directions, other
    personas (not for ``cap``), then the own vector's fluency row."""
    nt, own = len(ev.targets), own_directions(ev)
    for j in range(nt):
        for q in questions:
            arms = [own[j], *(("random", k) for k in range(ev.cfg.n_random))]
            if op != "cap":
                arms += [own[i] for i in range(nt) if i != j]
            for a in arms:
                ev.plan_row(plan, s, r, a, j, q, False)
            ev.plan_row(plan, s, r, own[j], j, q, True)


def _score(ev: Evaluator, plan: Plan, boot: Bootstrap, dir_w: np.ndarray, op: str, r: str,
           c: Chosen, questions: list[Question]) -> tuple[RecipeScore, np.ndarray]:
    """One chosen setting's :class:`RecipeScore` (Holm, beyond-random verdict and rank not yet
    set) from its run rows, and its own vector's edited KL per question ``[question]``."""
    cfg, nt, own = ev.cfg, len(ev.targets), own_directions(ev)
    s = c.setting

    def arr(direction_of: Any, fl: bool = False) -> np.ndarray:
        """``[target, question, 4]`` values for directions given per target."""
        return np.array([[ev.values(s, r, direction_of(j), j, q, plan, fl) for q in questions]
                         for j in range(nt)])

    mine = arr(lambda j: own[j], fl=True)  # [nt, nq, 4]
    rand = np.stack([arr(lambda j, k=k: ("random", k)) for k in range(cfg.n_random)])
    own_arm, own_draws = _arm(boot, mine)
    rand_arm, _ = _arm(boot, rand, dir_w)
    other_arm = spec = None
    if op != "cap" and nt > 1:
        other = np.stack([np.array([[ev.values(s, r, own[i], j, q, plan) for q in questions]
                                    for j in range(nt) if j != i]) for i in range(nt)])
        # other[i] : vector of persona i on every other target j
        flat = other.reshape(-1, len(questions), 4)
        other_arm, other_draws = _arm(boot, flat)
        spec = boot.estimate(own_arm.effect.mean - other_arm.effect.mean, own_draws - other_draws)
    flu_point, flu_draws = boot.mean(mine[..., 3])
    flu_ok = flu_point >= -cfg.fluency_margin
    rho = rho_p = None
    if len(c.curve) > 2:
        rho, rho_p = monotonicity([p.strength for p in c.curve], [p.lp_gain for p in c.curve])
    rand_eff = [kl_effect(rand[k]) for k in range(cfg.n_random)]
    # the own vector's effect and each direction's, as one formula on the same examples
    test = beyond_random(kl_effect(mine), rand_eff, cfg.random_test)
    score = RecipeScore(
        operator=op, recipe=r, setting=s, selection_effect=c.effect, interior=c.interior,
        fluency_ok=flu_ok, own=own_arm, random=rand_arm,
        random_effects=rand_eff,
        other=other_arm, specificity=spec, fluency=boot.estimate(flu_point, flu_draws),
        random_p=test.rank_p, random_test=test.test, random_test_p=test.p,
        random_t_p=_finite(test.t_p), random_skew=_finite(test.skew),
        examples=[Example(ev.targets[j].name, q.id, *map(float, mine[j, qi]))
                  for j in range(nt) for qi, q in enumerate(questions)],
        curve=c.curve, monotone_rho=rho, monotone_p=rho_p)
    return score, mine[..., 1].sum(0)


def _arm(boot: Bootstrap, v: np.ndarray, dir_w: np.ndarray | None = None
         ) -> tuple[Arm, np.ndarray]:
    """``v``: ``[..., question, 4]`` of (kl0, kl, lp gain, fluency)."""
    point, draws = boot.ratio_effect(v[..., 1], v[..., 0], dir_w)
    lp_point, lp_draws = boot.mean(v[..., 2], dir_w)
    wrong = float(np.mean(v[..., 1] > v[..., 0]))
    return Arm(boot.estimate(point, draws), boot.estimate(lp_point, lp_draws), wrong,
               int(np.prod(v.shape[:-1]))), draws


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
