"""What a steering run concludes: Holm over every recipe × operator, the ranks that sign-flip
tests separate, the rank p and the monotonicity test, the floors those tests cannot fall below,
each operator's verdict sentence and the one-sentence answer."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from tlpersona.analyses.stats import holm
from tlpersona.interventions.steering.bootstrap import rank_p, separated_ranks, t_prediction_needed
from tlpersona.interventions.steering.config import SteerConfig

if TYPE_CHECKING:
    # annotations only: the result's answer() is written here, so result imports this module
    from tlpersona.interventions.steering.result import RecipeScore, SteeringResult


ANSWER_CHARS = 220


def _fit(parts: list[str], limit: int = ANSWER_CHARS) -> str:
    """The first part and as many of the optional later ones as fit, ending in a full stop."""
    out = parts[0]
    for x in parts[1:]:
        if len(out) + len(x) + 1 <= limit:
            out += x
    return out + "."


def answer_text(result: SteeringResult, op: str) -> str:
    cfg = result.config
    alpha = cfg.significance
    family = len(result.scores)
    scores = result.scores_for(op)
    k = cfg.n_random
    verb = "steers to the persona" if op == "add" else "moves the persona to the base"
    beat = [s for s in scores if s.beats_random]
    if beat:
        s = beat[0]
        test = "parametric (t)" if s.random_test == "t" else "exact rank"
        parts = [f"{op}: {s.recipe} ({s.setting.label()}) {verb} beyond {k} random directions "
                 f"(own {s.own.effect.mean:.2f} vs mean {np.mean(s.random_effects):.2f}, "
                 f"{test} Holm p {s.random_p_holm:.2g})"]
        if s.specificity is not None:
            sp = s.specificity
            parts.append(f" and other personas' vectors by +{sp.mean:.2f} [{sp.lo:.2f}, "
                         f"{sp.hi:.2f}]" if sp.lo > 0 else
                         f" but not clearly beyond other personas' vectors ({sp.mean:+.2f} "
                         f"[{sp.lo:.2f}, {sp.hi:.2f}])")
        others = [x.recipe for x in beat[1:]]
        if others:
            above = all(x.rank > s.rank for x in beat[1:])
            named = ", ".join(others)
            if len("".join(parts)) + len(f"; also {named}, not separated.") > ANSWER_CHARS:
                named = f"{len(others)} more recipe{'s' if len(others) > 1 else ''}"
            parts.append(f", ranked above {named}" if above else f"; also {named}, not separated")
        return _fit(parts)
    if not scores:
        return f"{op}: nothing was scored."
    best = min(scores, key=lambda x: (x.random_p_holm, -x.own.effect.mean))
    rand = np.asarray(best.random_effects)
    parts = [f"{op}: no recipe's vector is called beyond {k} random directions; closest "
             f"{best.recipe} (own {best.own.effect.mean:.2f} vs mean {rand.mean():.2f}, "
             f"Holm p {best.random_p_holm:.2g})"]
    need_k = math.ceil(family / alpha)
    if best.random_p_holm < alpha and not best.fluency_ok:
        parts.append(f"; it fails the fluency guard ({best.fluency.mean:.2f} nats/token): "
                     "a gentler setting would have to pass it")
    elif best.random_test == "rank" and k >= need_k:
        parts.append(f"; it would need to beat more of the {k} random directions")
    elif best.random_test == "t" and k >= 3:
        need = t_prediction_needed(best.random_effects, alpha / family)
        parts.append(f"; it would need own ≥ {need:.2f}, or ≥ {need_k} random directions with "
                     "the exact rank test")
    else:
        why = ("" if cfg.random_test == "rank" else " (the t-prediction needs 3 directions)"
               if k < 3 else " (random effects right-skewed)")
        parts.append(f"; the exact rank test{why} needs ≥ {need_k} random directions")
    return _fit(parts)


def rank_and_verdict(scores: list[RecipeScore], kl_q: dict[tuple[str, str], np.ndarray],
                     cfg: SteerConfig) -> dict[str, str]:
    """Set every score's Holm p over the whole run (one family: "this recipe's vector moves
    the model more than a random direction"), its beyond-random call and, per operator, its
    rank from the sign-flip tests on ``kl_q`` (edited KL per scoring question ``[question]``);
    returns each operator's verdict sentence."""
    for x, p in zip(scores, holm([x.random_test_p for x in scores]), strict=True):
        x.random_p_holm = float(p)
        x.beats_random = bool(p < cfg.significance and x.fluency_ok)
    verdicts = {}
    for op in cfg.operators:
        of_op = [x for x in scores if x.operator == op]
        ranks = separated_ranks([kl_q[op, x.recipe] for x in of_op], cfg.level, cfg.seed)
        for x, k in zip(of_op, ranks, strict=True):
            x.rank = k
        verdicts[op] = _verdict(op, of_op, cfg.n_random, len(scores), cfg.significance,
                                cfg.random_test)
    return verdicts


def monotonicity(strength: list[float], gain: list[float]) -> tuple[float, float]:
    """Spearman ρ of ``gain`` against ``strength`` and its two-sided permutation p (every
    pairing enumerated when there are at most 8 points: exact)."""
    def rho(x: np.ndarray) -> float:
        return float(stats.spearmanr(strength, x).statistic)

    res = stats.permutation_test((np.asarray(gain, dtype=float),), rho,
                                 permutation_type="pairings", n_resamples=9999,
                                 alternative="two-sided", random_state=np.random.default_rng(0))
    return rho(np.asarray(gain, dtype=float)), float(res.pvalue)


def random_rank_p(own: float, random: list[float]) -> float:
    """Rank p of ``own`` among the random directions' effects: (1 + #random ≥ own) / (N + 1),
    what a direction exchangeable with the random ones would reach (never below 1/(N + 1))."""
    return rank_p(own, random)


def rank_floor(n_questions: int, n_pairs: int) -> float:
    """The smallest Holm-adjusted p :func:`separated_ranks` can give a pair: 2 / 2**n (both
    all-same-sign patterns) when every pattern is enumerated, else what 1,000 sampled patterns
    give on average (they hit those two 2000 / 2**n times), times the pairs."""
    n = n_questions
    one = 2 / 2**n if 2**n <= 1000 else (1 + 2000 / 2**n) / 1001
    return min(1.0, n_pairs * one)


def questions_to_separate(n_pairs: int, alpha: float) -> int:
    """Fewest scoring questions with which :func:`separated_ranks` can separate a pair."""
    return next(n for n in range(1, 64) if rank_floor(n, n_pairs) < alpha)


def monotone_floor(n_strengths: int) -> float:
    """The smallest exact two-sided p :func:`monotonicity` can give: 2 / n! (the two perfectly
    ordered pairings; exact up to 8 strengths, where every pairing is enumerated)."""
    return 2 / math.factorial(n_strengths) if n_strengths <= 8 else 0.0


def _test_words(test: str, n_random: int) -> str:
    if test == "t":
        return (f"one-sided t-prediction p over {n_random} random directions: parametric, it "
                "assumes their effects are normal (valid, conservative, when they are left-"
                "skewed; the skewness check only screens out pools that look right-skewed, and "
                "on heavy-tailed or right-skewed pools its rate at Holm thresholds can exceed "
                "nominal)")
    return f"rank p over {n_random} random directions, exact"


def _verdict(op: str, scores: list[RecipeScore], n_random: int, family: int, alpha: float,
             random_test: str = "rank") -> str:
    ranked = sorted(scores, key=lambda s: (s.rank, -s.own.effect.mean))
    beat = [s for s in ranked if s.beats_random]
    # where the t-prediction was asked for but the pool's shape (or size) ruled it out
    skewed = [s for s in ranked if random_test == "t" and s.random_test == "rank"
              and s.random_skew is not None and s.random_skew > 0]
    all_rank = all(s.random_test == "rank" for s in scores)
    rank_floor_blocks = family / (n_random + 1) >= alpha
    need = math.ceil(family / alpha)
    if beat:
        tests = sorted({s.random_test for s in beat}, reverse=True)
        head = (f"{', '.join(f'{s.recipe} ({s.setting.label()})' for s in beat)} beyond the "
                f"random directions ({'; '.join(_test_words(t, n_random) for t in tests)}; "
                f"Holm-adjusted over {family} recipe × operator tests, < {alpha:g})")
        if op == "ablate":
            # an isotropic direction carries almost none of the residual's variance
            head += (" — removing a random direction removes almost nothing, so this says the "
                     "vector carries more of the run than a typical direction, not that it is "
                     "the persona; the other personas' vectors (specificity) are the stricter "
                     "control")
    elif all_rank and rank_floor_blocks:
        why = (" (the t-prediction needs at least 3 directions whose effects are not "
               "right-skewed)" if random_test == "t" else "")
        head = (f"no recipe can be called beyond the random directions{why}: with {n_random} of "
                f"them the rank p cannot fall below {1 / (n_random + 1):.3f}, too coarse for "
                f"{family} tests after Holm (at least {need} random directions would be needed)")
        skewed = []  # said already
    elif random_test == "t":
        best = min(scores, key=lambda s: (s.random_p_holm, -s.own.effect.mean))
        head = (f"no recipe's own vector is beyond the random directions "
                f"({_test_words('t', n_random)}; Holm over {family} tests): closest "
                f"{best.recipe}, Holm p {best.random_p_holm:.3f}")
    else:
        head = "no recipe's own vector is beyond the random directions (Holm-adjusted rank p)"
    if skewed:
        head += (f"; the random effects of {', '.join(s.recipe for s in skewed)} are right-skewed "
                 f"(skewness up to {max(s.random_skew or 0.0 for s in skewed):+.2f}), where the "
                 "t-prediction is not trusted, so their exact rank p decides"
                 + (f", which cannot fall below {1 / (n_random + 1):.3f} (at least {need} random "
                    "directions would be needed)" if rank_floor_blocks else ""))
    n_q = scores[0].own.effect.n
    n_pairs = len(scores) * (len(scores) - 1) // 2
    if len(scores) == 1:
        order = ""
    elif len({s.rank for s in scores}) == 1 and rank_floor(n_q, n_pairs) >= alpha:
        order = (f"; the recipes cannot be separated from one another: sign-flip tests over "
                 f"{n_q} scoring questions, Holm-adjusted over {n_pairs} pairs, cannot fall below "
                 f"{rank_floor(n_q, n_pairs):.2f} (at least {questions_to_separate(n_pairs, alpha)} "
                 "scoring questions would be needed)")
    elif len({s.rank for s in scores}) == 1:
        order = ("; no recipe is separated from another (sign-flip tests over the "
                 f"{n_q} scoring questions, Holm-adjusted over pairs)")
    else:
        top = [s.recipe for s in ranked if s.rank == 1]
        order = (f"; {', '.join(top)} ranked first; ranks by sign-flip tests over questions, "
                 "Holm-adjusted: " + ", ".join(f"{s.recipe} {s.rank}" for s in ranked))
    broken = [s.recipe for s in ranked if not s.fluency_ok]
    tail = f"; {', '.join(broken)} failed the fluency guard" if broken else ""
    return f"{op}: {head}{order}{tail}."
