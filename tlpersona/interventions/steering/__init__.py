"""Which recipe's vector is causally the persona: steering, ablation and capping, selected on
some questions and scored on others, against random directions and other personas' vectors.

Sequences, for a target persona X, a question q and greedy responses ``r_X`` (X's) and ``r_0``
(the base persona's) of ``response_tokens`` tokens:

* ``base(q) + r_X`` — the base persona's prompt followed by X's response, teacher-forced;
* ``X(q) + r_X`` — X's own run;
* ``base(q) + r_0`` and ``X(q) + r_0`` — for the fluency guard.

Operators (one formula, :mod:`tlpersona.runtime.edits`), at ``blocks.l.hook_resid_post``:

* ``add``: ``alpha * s_l * v/|v|`` added to the base run at every token after its system block,
  with ``v = centroid_R(X) - mean of every stored persona`` and ``s_l`` the layer's typical
  residual norm (median token norm after the system block in the base runs of the selection
  questions), so recipes are compared at equal relative strength. Goal: the base run becomes X.
* ``ablate``: ``v/|v|`` projected out of X's run from the first system-text token on. Goal: X's
  run becomes the base.
* ``cap``: on X's run, the projection onto the base persona's axis (its centroid minus the mean
  of the others, unit length) raised to at least the ``p``-th percentile of the stored
  personas' centroid projections (the Assistant-Axis intervention). Goal: X becomes the base.

Effect of an edit on an example (X, q): ``1 - KL_edit / KL_0`` where KL is mean over the read
positions (last prompt token and every teacher-forced token) of ``KL(P_goal || P_edited)`` and
``KL_0`` the same without the edit; aggregated as a ratio of sums. Also: the mean per-token
log-prob gain of ``r_X`` (raised by ``add``; lowered, and counted as a gain, by the removals).
The fluency guard: the mean per-token log-prob change of ``r_0`` — for ``add`` measured
against the persona's own (X's unedited run is allowed to find ``r_0`` less likely than the base
does, the steered base no less fluent than that), for removals against the unedited X run.
A selected setting whose guard falls below ``-fluency_margin`` nats/token cannot count as
beating the controls (it is flagged in the report).

Selection: for each operator and recipe the layer (or, for the removals, every given layer
together) and strength with the largest own-vector effect on the *selection* questions (whose
effect-against-strength curve is kept, for the monotonicity check). Scoring, on the other
questions only: the persona's own vector, ``n_random`` seeded random directions (unit, for
``add`` of the same norm), and the other target personas' vectors (specificity: X's vector
moves the model toward X more than Y's vector does), and the fluency guard. Intervals:
bootstrap over questions (:mod:`tlpersona.interventions.steering.bootstrap`); recipes are ranked
only where a sign-flip test over the scoring questions, Holm-adjusted over the pairs, separates
them.
"Beyond random" (Holm over every recipe × operator): by default the one-sided t-prediction p of
the own effect against the random directions' effects, trusted only where those are not
right-skewed (:func:`~tlpersona.interventions.steering.bootstrap.beyond_random`), else — and
with ``random_test="rank"`` always — the exact rank p, which needs at least tests / α
directions.

:func:`steer` runs the phases in order; each has its module: ``config`` (options and their
checks), ``evaluate`` (sequences, directions and edited rows), ``select``, ``score``,
``verdict`` (Holm, ranks, sentences), ``continuations`` and ``result``; the rows run in
``batch``, the intervals and tests come from ``bootstrap``.
"""

from __future__ import annotations

from tlpersona.cache.source import ActivationSource
from tlpersona.data import Inputs, Persona, Question
from tlpersona.errors import TlpersonaError
from tlpersona.interventions.runner import Runner
from tlpersona.interventions.selection import choose_personas, default_recipes
from tlpersona.interventions.steering.config import SteerConfig, check_config, min_questions
from tlpersona.interventions.steering.continuations import greedy_continuations
from tlpersona.interventions.steering.evaluate import Evaluator
from tlpersona.interventions.steering.result import SteeringResult
from tlpersona.interventions.steering.score import score_settings
from tlpersona.interventions.steering.select import select_settings, split_questions
from tlpersona.interventions.steering.verdict import rank_and_verdict
from tlpersona.models.loading import LoadedModel

__all__ = ["SteerConfig", "SteeringResult", "steer"]


def steer(store: ActivationSource, model: LoadedModel, personas: list[Persona], questions: list[Question],
          cfg: SteerConfig, questions_note: str = "") -> SteeringResult:
    """Evaluate every operator × recipe (see module doc). ``personas``: every persona of the
    store (the targets are chosen among them); ``questions``: the evaluation questions."""
    import time

    t0 = time.perf_counter()
    check_config(cfg, store)
    need = min_questions(cfg, store)
    if len(questions) < need:
        raise TlpersonaError(f"steering these recipes needs at least {need} questions")
    runner = Runner(model, cfg.max_rows)
    by_name = {p.name: p for p in personas}
    recipes = cfg.recipes or default_recipes(store)
    layers = cfg.layers or list(store.layers)
    mid = layers[len(layers) // 2]
    choice = choose_personas(store, cfg.base, cfg.n_personas, cfg.personas, recipes, mid)
    if cfg.base not in by_name or any(n not in by_name for n in choice.names):
        raise TlpersonaError("the personas given do not include the store's personas")
    targets = [by_name[n] for n in choice.names]
    sel_q, score_q = split_questions(questions, cfg.seed)
    ev = Evaluator(runner, store, cfg, targets, by_name[cfg.base], sel_q + score_q)
    ev.build()
    ev.unedited()
    ev.norm = ev.typical_norms(sel_q)
    ev.directions()
    chosen = select_settings(ev, sel_q)
    scores, kl_q = score_settings(ev, chosen, score_q)
    verdicts = rank_and_verdict(scores, kl_q, cfg)
    result = SteeringResult(
        config=cfg, store_manifest_hash=store.manifest_hash, model=str(runner.model.info.spec),
        base=cfg.base, personas=choice, selection_questions=[q.id for q in sel_q],
        scoring_questions=[q.id for q in score_q], questions_note=questions_note, layers=layers,
        recipes=recipes, typical_norm=ev.norm, scores=scores, verdicts=verdicts,
        inputs=Inputs.of(runner.model.info.identity, [by_name[cfg.base], *targets],
                         sel_q + score_q, store.manifest_hash))
    if cfg.continuations and "add" in cfg.operators:
        result.continuations = greedy_continuations(ev, result, score_q[0])
    result.seconds = time.perf_counter() - t0
    return result
