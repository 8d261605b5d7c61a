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
bootstrap over questions (:mod:`tlpersona.interventions.steer_stats`); recipes are ranked only where
a sign-flip test over the scoring questions, Holm-adjusted over the pairs, separates them.
"Beyond random" (Holm over every recipe × operator): by default the one-sided t-prediction p of
the own effect against the random directions' effects, trusted only where those are not
right-skewed (:func:`~tlpersona.interventions.steer_stats.beyond_random`), else — and with
``random_test="rank"`` always — the exact rank p, which needs at least tests / α directions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from tlpersona.analyses.stats import holm
from tlpersona.cache.source import ActivationSource
from tlpersona.cache.vectors import axis, centred
from tlpersona.chat.template import Spans
from tlpersona.data import Inputs, Persona, Question, system_prompt
from tlpersona.errors import TlpersonaError
from tlpersona.interventions.runner import Runner
from tlpersona.interventions.steer_batch import Edit, Row, row_edits, run_rows
from tlpersona.interventions.steer_stats import (
    RANDOM_TESTS,
    Bootstrap,
    Estimate,
    beyond_random,
    rank_p,
    separated_ranks,
    t_prediction_needed,
)
from tlpersona.models.loading import LoadedModel
from tlpersona.runtime.edits import OPERATORS, unit
from tlpersona.version import __version__

DEFAULT_ALPHAS = (0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0)
DEFAULT_PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0)
GOAL = {"add": "the base run toward the persona", "ablate": "the persona's run toward the base",
        "cap": "the persona's run toward the base"}


@dataclass
class SteerConfig:
    """``alphas``: steering strengths in units of the layer's typical residual norm;
    ``cap_percentiles``: capping thresholds as percentiles of the stored personas' projections.
    ``n_personas`` contrasting personas are chosen unless ``personas`` names them."""

    recipes: list[str] | None = None  # default: every stored position but `first`
    layers: list[int] | None = None  # default: every stored layer
    operators: list[str] = field(default_factory=lambda: list(OPERATORS))
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    cap_percentiles: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    personas: list[str] | None = None
    n_personas: int = 4
    base: str = "assistant"
    n_random: int = 10
    random_test: str = "t"  # "t": shape-checked t-prediction over the directions; "rank": exact
    response_tokens: int = 16
    prompt_index: int = 0
    seed: int = 0
    n_boot: int = 2000
    level: float = 0.95
    fluency_margin: float = 0.5
    max_rows: int = 16
    continuations: int = 2
    continuation_tokens: int = 24
    progress: bool = True

    @property
    def significance(self) -> float:
        """``1 - level`` rounded, so that a p equal to it (a rank p of 1/20 at 0.95) is not
        counted as below it through the float error of the subtraction."""
        return round(1 - self.level, 12)


@dataclass
class Setting:
    """One candidate: operator, the layers it edits together, and its strength (alpha for
    ``add``, percentile for ``cap``, 1 for ``ablate``)."""

    operator: str
    layers: tuple[int, ...]
    strength: float

    def label(self) -> str:
        where = "L" + "+".join(map(str, self.layers))
        if self.operator == "add":
            return f"{where} alpha {self.strength:g}"
        if self.operator == "cap":
            return f"{where} p{self.strength:g}"
        return where


@dataclass
class Arm:
    """One set of directions applied at the selected setting, scored on the scoring questions:
    the KL effect, the log-prob gain of the target response (nats/token), the fraction of
    examples steered the wrong way (KL grew), and the per-example KL gains."""

    effect: Estimate
    lp_gain: Estimate
    wrong_way: float
    n_examples: int


@dataclass
class Example:
    persona: str
    question: str
    kl0: float
    kl: float
    lp_gain: float
    fluency: float


@dataclass
class CurvePoint:
    """Own-vector effect and log-prob gain at one strength (selection questions)."""

    strength: float
    effect: float
    lp_gain: float


@dataclass
class RecipeScore:
    operator: str
    recipe: str
    setting: Setting
    selection_effect: float
    interior: bool | None  # selected strength strictly inside the grid (None: no grid)
    fluency_ok: bool  # the selected setting passes the fluency guard (scoring questions)
    own: Arm
    random: Arm
    random_effects: list[float]  # per random direction (point estimates)
    other: Arm | None  # other target personas' vectors on the same targets
    specificity: Estimate | None  # own effect - other effect (paired)
    fluency: Estimate  # guard value of the own vector (nats/token, see module doc)
    # rank p of the own effect among the random directions' effects, (1 + #random >= own) /
    # (n_random + 1): exact, descriptive with few directions (never below 1/(n_random + 1))
    random_p: float
    # Holm over every recipe × operator of the run, of `random_test_p` (the p the claim uses)
    random_p_holm: float = 1.0
    beats_random: bool = False  # random_p_holm < alpha and the fluency guard passes
    random_test: str = "rank"  # the test behind random_test_p: "t" (t-prediction) or "rank"
    random_test_p: float = 1.0  # its p, before Holm
    random_t_p: float | None = None  # one-sided t-prediction p (steer_stats.t_prediction_p)
    random_skew: float | None = None  # sample skewness of the random effects (its shape check)
    rank: int = 0
    examples: list[Example] = field(default_factory=list)
    curve: list[CurvePoint] = field(default_factory=list)  # selection questions, own vector
    monotone_rho: float | None = None  # Spearman(strength, lp gain) along the curve
    monotone_p: float | None = None  # its two-sided permutation p (exact: every ordering)


@dataclass
class Continuation:
    persona: str
    question: str
    recipe: str
    setting: str
    base: str
    steered: str
    random: str
    persona_itself: str
    base_logprob: dict[str, float]  # mean per-token log-prob of each text under the base model


@dataclass
class PersonaChoice:
    names: list[str]
    reason: str
    axis_position: dict[str, float]  # mean standardised projection on the base axis


@dataclass
class SteeringResult:
    config: SteerConfig
    store_manifest_hash: str
    model: str
    base: str
    personas: PersonaChoice
    selection_questions: list[str]
    scoring_questions: list[str]
    questions_note: str
    layers: list[int]
    recipes: list[str]
    typical_norm: dict[int, float]
    scores: list[RecipeScore]
    verdicts: dict[str, str]  # operator -> sentence
    seconds: float = 0.0
    continuations: list[Continuation] = field(default_factory=list)
    inputs: Inputs | None = None  # the model, persona prompts, questions and store it ran on
    code_version: str = field(default=__version__, repr=False)  # the version that computed it

    def to_dict(self) -> dict[str, Any]:
        """steering.json."""
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> SteeringResult:
        """A saved steering result: ``path`` is its steering.json or the directory holding it."""
        from tlpersona.infra.resultjson import Reader
        from tlpersona.infra.resultsets import read_result

        file, data = read_result(path, "steering")
        return Reader(file, data.get("code_version")).dataclass(cls, data, "")

    def to_frame(self) -> Any:
        """One row per recipe × operator score (its setting, effect, tests and verdict) as a
        pandas DataFrame."""
        from tlpersona.infra.resultjson import frame

        return frame(self.scores)

    def __repr__(self) -> str:
        from tlpersona.infra.resultjson import clip

        return (f"SteeringResult(recipes {', '.join(self.recipes)}, layers {self.layers}, "
                f"operators {', '.join(self.config.operators)}, base {self.base!r})\n  "
                f"{clip(self.answer())}")

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """steering.json, figures/ and steering.md into ``out`` (one set, swapped in whole;
        earlier results there only with ``overwrite``); returns steering.md's path."""
        from tlpersona.infra.resultsets import results_set
        from tlpersona.report.html import write_html
        from tlpersona.report.steering import write_steering

        with results_set(out, "steering", overwrite, finish=write_html) as stage:
            write_steering(self, stage)
        return Path(out) / "steering.md"

    def write_json(self, path: str | Path) -> Path:
        from tlpersona.infra.files import atomic_write_bytes

        path = Path(path)
        atomic_write_bytes(path, json.dumps(_jsonable(self.to_dict()), indent=1).encode())
        return path

    def scores_for(self, operator: str) -> list[RecipeScore]:
        return sorted((s for s in self.scores if s.operator == operator),
                      key=lambda s: (s.rank, -s.own.effect.mean))

    def answer(self) -> str:
        """One sentence (at most :data:`ANSWER_CHARS` characters), with numbers: which recipe's
        vector steers toward the persona beyond the random directions and beyond the other
        personas' vectors, in the order the ranking test separates; or, when none is called,
        what would have to change for the test to call one. Reads ``add`` when it ran (the
        operator that steers toward the persona), else the first operator."""
        op = "add" if "add" in self.config.operators else self.config.operators[0]
        return _answer(self, op)


ANSWER_CHARS = 220


def _fit(parts: list[str], limit: int = ANSWER_CHARS) -> str:
    """The first part and as many of the optional later ones as fit, ending in a full stop."""
    out = parts[0]
    for x in parts[1:]:
        if len(out) + len(x) + 1 <= limit:
            out += x
    return out + "."


def _answer(result: SteeringResult, op: str) -> str:
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


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# inputs


def random_directions(d: int, k: int, seed: int, layer: int) -> torch.Tensor:
    """``[k, d]`` seeded Gaussian directions of unit length, one set per (seed, layer)."""
    g = torch.Generator().manual_seed(seed * 100_003 + layer)
    return unit(torch.randn(k, d, generator=g, dtype=torch.float64)).float()


def default_recipes(store: ActivationSource) -> list[str]:
    """Every stored position but ``first``: token 0 is the same in every prompt, so its persona
    vector is zero and steering with it is meaningless."""
    return [p for p in store.positions if p != "first"]


def choose_personas(store: ActivationSource, base: str, n: int, names: list[str] | None,
                    recipes: list[str], layer: int) -> PersonaChoice:
    """``names`` as given, else the ``n`` stored personas farthest from the base on its axis
    (projection of each recipe's centroids, standardised per recipe, averaged over recipes)."""
    others = [p for p in store.personas if p != base]
    li = store.layer_index(layer)
    b = store.personas.index(base)
    z = np.zeros(len(store.personas))
    for r in recipes:
        c = store.centroids(r)[:, li]
        proj = (c.double() @ unit(axis(c, b))).numpy()
        z += (proj - proj.mean()) / (proj.std() or 1.0)
    z /= len(recipes)
    position = {p: float(z[i]) for i, p in enumerate(store.personas)}
    if names:
        return PersonaChoice(list(names), "named by hand", position)
    chosen = sorted(others, key=lambda p: position[p])[:n]
    return PersonaChoice(chosen, f"the {len(chosen)} stored personas farthest from {base!r} on "
                         f"its axis at layer {layer} (mean standardised projection over "
                         f"{len(recipes)} recipes; lowest first)", position)


def split_questions(questions: list[Question], seed: int) -> tuple[list[Question], list[Question]]:
    """Seeded split: the first ``n // 2`` of a permutation select, the rest are scored."""
    if len(questions) < 2:
        raise TlpersonaError("steering needs at least two questions (some to select the "
                             "setting on, others to score it on)")
    order = np.random.default_rng(seed).permutation(len(questions))
    k = len(questions) // 2
    return [questions[i] for i in order[:k]], [questions[i] for i in order[k:]]


def check_config(cfg: SteerConfig, store: ActivationSource) -> None:
    """Every setting checked against the store, before any forward pass."""
    bad = [o for o in cfg.operators if o not in OPERATORS]
    if bad or not cfg.operators:
        raise TlpersonaError(f"unknown operator {bad[0] if bad else '(none)'!r} "
                             f"({', '.join(OPERATORS)})")
    if "add" in cfg.operators and (not cfg.alphas or min(cfg.alphas) <= 0):
        raise TlpersonaError("`alphas` must be positive numbers (0 is the unsteered reference)")
    if "cap" in cfg.operators and (not cfg.cap_percentiles
                                   or not all(0 <= p <= 100 for p in cfg.cap_percentiles)):
        raise TlpersonaError("`cap_percentiles` must lie in [0, 100]")
    if cfg.random_test not in RANDOM_TESTS:
        raise TlpersonaError(f"unknown `random_test` {cfg.random_test!r} ({', '.join(RANDOM_TESTS)})")
    if cfg.response_tokens < 1:
        raise TlpersonaError("`response_tokens` must be at least 1")
    if not 0 < cfg.level < 1 or cfg.n_boot < 100:
        raise TlpersonaError("the bootstrap needs a level in (0, 1) and at least 100 draws")
    if not math.isfinite(cfg.fluency_margin) or cfg.fluency_margin < 0:
        raise TlpersonaError("`fluency_margin` must be a number of nats/token, at least 0")
    if cfg.continuations < 0 or (cfg.continuations and cfg.continuation_tokens < 1):
        raise TlpersonaError("`continuations` must be at least 0, with at least one "
                             "`continuation_tokens`")
    if cfg.max_rows < 1:
        raise TlpersonaError("`max_rows` must be at least 1")
    for r in cfg.recipes or []:
        if r not in store.positions:
            raise TlpersonaError(f"recipe {r} is not in the store (stored: "
                                 f"{', '.join(store.positions)})")
        if r == "first":
            raise TlpersonaError("recipe first cannot steer: token 0 is the same in every "
                                 "prompt, so its persona vectors are zero")
    recipes = cfg.recipes or default_recipes(store)
    if not recipes:
        raise TlpersonaError("the store holds no recipe to steer with (only `first`)")
    check_random(cfg, len(recipes) * len(cfg.operators))
    for layer in cfg.layers or []:
        store.layer_index(layer)
    if cfg.base not in store.personas:
        raise TlpersonaError(f"base persona {cfg.base!r} is not in the store")
    missing = [p for p in cfg.personas or [] if p not in store.personas]
    if missing:
        raise TlpersonaError(f"`personas`: {missing[0]!r} is not in the store")
    if cfg.base in (cfg.personas or []):
        raise TlpersonaError(f"`personas`: {cfg.base!r} is the base persona; name others")
    if cfg.personas is None and cfg.n_personas < 1:
        raise TlpersonaError("`n_personas` must be at least 1")
    if not [p for p in store.personas if p != cfg.base]:
        raise TlpersonaError(f"the store holds no persona besides the base {cfg.base!r} to steer to")


def check_random(cfg: SteerConfig, family: int) -> None:
    """Refuse a count of random directions with which "beyond random" cannot be called for any
    recipe: the t-prediction needs 3 of them (with fewer, the rank p would decide, which
    cannot fall below 1/3); the exact rank p, Holm-adjusted over ``family`` tests, cannot fall
    below ``family / (n_random + 1)``."""
    if cfg.n_random < 1:
        raise TlpersonaError("`n_random` must be at least 1")
    alpha = cfg.significance
    need = math.ceil(family / alpha)
    if cfg.random_test == "rank" and family / (cfg.n_random + 1) >= alpha:
        raise TlpersonaError(f"`n_random` {cfg.n_random} is too few for `random_test` rank: over "
                             f"{family} recipe × operator tests its Holm-adjusted p cannot fall "
                             f"below {alpha:g} with fewer than {need} random directions")
    if cfg.random_test == "t" and cfg.n_random < 3:
        raise TlpersonaError(f"`n_random` {cfg.n_random} is too few for a beyond-random test: the "
                             "t-prediction needs at least 3 random directions (the exact rank "
                             f"test, {need} for {family} recipe × operator tests)")


def min_questions(cfg: SteerConfig, store: ActivationSource) -> int:
    """Fewest evaluation questions that give every test of the run: one to select the setting
    on, and two to score it on where recipes are ranked against each other (a sign-flip test
    over the scoring questions; one scoring question otherwise)."""
    return 3 if len(cfg.recipes or default_recipes(store)) > 1 else 2


# ---------------------------------------------------------------------------------------------
# the evaluation


class _Plan:
    """Rows to run, deduplicated by (sequence, edit) key; results by key."""

    def __init__(self) -> None:
        self.rows: dict[tuple, Row] = {}
        self.meta: dict[tuple, tuple | None] = {}

    def add(self, key: tuple, row: Row, ref: tuple | None) -> None:
        if key not in self.rows:
            self.rows[key] = row
            self.meta[key] = ref


class _Eval:
    def __init__(self, runner: Runner, store: ActivationSource, cfg: SteerConfig, targets: list[Persona],
                 base: Persona, questions: list[Question]):
        self.runner, self.store, self.cfg = runner, store, cfg
        self.targets, self.base, self.questions = targets, base, questions
        self.recipes = cfg.recipes or default_recipes(store)
        self.layers = cfg.layers or list(store.layers)
        self.results: dict[tuple, tuple[float, float]] = {}  # key -> (kl, lp)
        self.refs: dict[tuple, torch.Tensor] = {}
        self.norm: dict[int, float] = {}

    def prompt(self, p: Persona) -> str:
        return system_prompt(p, self.cfg.prompt_index)

    # -- sequences ------------------------------------------------------------------------------

    def build(self) -> None:
        r, cfg = self.runner, self.cfg
        ps = [self.base, *self.targets]
        convs = [(p, q, r.conversation(self.prompt(p), q.text)) for p in ps for q in self.questions]
        resp = r.greedy([c.ids for *_, c in convs], cfg.response_tokens)
        self.resp = {(p.name, q.id): ids for (p, q, _), ids in zip(convs, resp, strict=True)}
        self.seq: dict[tuple, Any] = {}
        for q in self.questions:
            r0 = self.resp[self.base.name, q.id]
            self.seq["A0", q.id] = r.conversation(self.prompt(self.base), q.text, r0)
            for p in self.targets:
                rx = self.resp[p.name, q.id]
                self.seq["A", p.name, q.id] = r.conversation(self.prompt(self.base), q.text, rx)
                self.seq["B", p.name, q.id] = r.conversation(self.prompt(p), q.text, rx)
                self.seq["B0", p.name, q.id] = r.conversation(self.prompt(p), q.text, r0)
        a0 = self.seq["A0", self.questions[0].id]
        self.steer_start = after_system(a0.spans)
        self.prefix = a0.ids[:self.steer_start]

    def unedited(self) -> None:
        """Reference log-probs (kept for the KL sequences) and unedited KL / log-prob values."""
        keys = list(self.seq)
        rows = [Row(self.seq[k].ids, self.seq[k].read) for k in keys]
        lps: dict[tuple, torch.Tensor] = {}
        for i, lp in run_rows(self.runner, rows, self.cfg.max_rows, self.prefix):
            lps[keys[i]] = lp
        for k in keys:
            if k[0] in ("A", "B"):
                self.refs[k] = lps[k].float()
        self.lp0 = {k: _target_logprob(lps[k], self.seq[k].ids, self.seq[k].read) for k in keys}
        self.kl0 = {}
        for p in self.targets:
            for q in self.questions:
                a, b = ("A", p.name, q.id), ("B", p.name, q.id)
                self.kl0[a] = float(_kl(lps[b], lps[a]).mean())  # add: goal P_X, edited: base
                self.kl0[b] = float(_kl(lps[a], lps[b]).mean())  # removals: goal P_base

    def typical_norms(self, questions: list[Question]) -> dict[int, float]:
        from tlpersona.interventions.runner import hook_name

        norms: dict[int, list[torch.Tensor]] = {la: [] for la in self.layers}
        for q in questions:
            conv = self.seq["A0", q.id]
            acts = self.runner.cache(conv.ids, [hook_name("resid_post", la) for la in self.layers])
            for la in self.layers:
                norms[la].append(acts[hook_name("resid_post", la)][self.steer_start:].norm(dim=-1))
        return {la: float(torch.cat(v).median()) for la, v in norms.items()}

    def directions(self) -> None:
        st, cfg = self.store, self.cfg
        tidx = [st.personas.index(p.name) for p in self.targets]
        b = st.personas.index(self.base.name)
        d = self.runner.model.info.d_model
        self.own: dict[tuple[str, int], torch.Tensor] = {}  # [target, d] unit
        self.axis: dict[tuple[str, int], torch.Tensor] = {}  # [d]
        self.cent: dict[tuple[str, int], torch.Tensor] = {}
        for r in self.recipes:
            cent = st.centroids(r)
            for la in self.layers:
                c = cent[:, st.layer_index(la)]
                self.cent[r, la] = c
                self.own[r, la] = persona_directions(c, tidx)
                self.axis[r, la] = unit(axis(c, b)).float()
        self.rand = {la: random_directions(d, cfg.n_random, cfg.seed, la) for la in self.layers}

    def tau(self, recipe: str, layer: int, u: torch.Tensor, pct: float) -> float:
        proj = (self.cent[recipe, layer].double() @ u.double()).numpy()
        return float(np.percentile(proj, pct))

    # -- rows -----------------------------------------------------------------------------------

    def edits(self, s: Setting, recipe: str, direction: tuple, seq_key: tuple) -> list[Edit]:
        """Edits of one row. ``direction``: ("persona", i) a target's vector, ("random", k)."""
        out = []
        for la in s.layers:
            kind, i = direction
            if s.operator == "cap":
                u = self.axis[recipe, la] if kind == "persona" else self.rand[la][i]
            else:
                u = self.own[recipe, la][i] if kind == "persona" else self.rand[la][i]
            if s.operator == "add":
                out.append(Edit(la, self.steer_start, delta=added_vector(s.strength, self.norm[la], u)))
            else:
                start = self.seq[seq_key].spans.anchors["sys_start"]
                lo = 0.0 if s.operator == "ablate" else self.tau(recipe, la, u, s.strength)
                out.append(Edit(la, start, u=u, lo=lo, hi=0.0 if s.operator == "ablate" else math.inf))
        return out

    def plan_row(self, plan: _Plan, s: Setting, recipe: str, direction: tuple, target: int,
                 q: Question, fluency: bool) -> tuple:
        """Plan one row (once) and return its key."""
        p = self.targets[target].name
        main = ("A", p, q.id) if s.operator == "add" else ("B", p, q.id)
        seq_key = (("A0", q.id) if s.operator == "add" else ("B0", p, q.id)) if fluency else main
        # a random direction's edit does not depend on the recipe, except a cap's threshold
        dkey = (recipe if direction[0] == "persona" or s.operator == "cap" else None, direction)
        key = (seq_key, s.operator, s.layers, s.strength, dkey)
        if key not in plan.rows:
            conv = self.seq[seq_key]
            plan.add(key, Row(conv.ids, conv.read, self.edits(s, recipe, direction, seq_key)),
                     None if fluency else main)
        return key

    def run(self, plan: _Plan, desc: str) -> None:
        todo = [k for k in plan.rows if k not in self.results]
        rows = [plan.rows[k] for k in todo]
        bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not self.cfg.progress)
        for i, lp in run_rows(self.runner, rows, self.cfg.max_rows, self.prefix):
            k = todo[i]
            ref = plan.meta[k]
            kl = float(_kl(self.refs[_goal(ref)].double(), lp).mean()) if ref else float("nan")
            self.results[k] = (kl, _target_logprob(lp, plan.rows[k].ids, plan.rows[k].read))
            bar.update(1)
        bar.close()

    # -- per-example values ---------------------------------------------------------------------

    def values(self, s: Setting, recipe: str, direction: tuple, target: int, q: Question,
               plan: _Plan, fluency: bool = False) -> tuple[float, float, float, float]:
        """(kl0, kl, log-prob gain toward the goal, fluency guard or nan) of a planned example."""
        p = self.targets[target].name
        main = ("A", p, q.id) if s.operator == "add" else ("B", p, q.id)
        kl, lp = self.results[self.plan_row(plan, s, recipe, direction, target, q, False)]
        gain = lp - self.lp0[main] if s.operator == "add" else self.lp0[main] - lp
        flu = float("nan")
        if fluency:
            _, lp_f = self.results[self.plan_row(plan, s, recipe, direction, target, q, True)]
            if s.operator == "add":
                # the steered base's change on r_0, against persona X's own (when it is a loss)
                ref = self.lp0["B0", p, q.id] - self.lp0["A0", q.id]
                flu = (lp_f - self.lp0["A0", q.id]) - min(ref, 0.0)
            else:
                flu = lp_f - self.lp0["B0", p, q.id]
        return self.kl0[main], kl, gain, flu


def _goal(main: tuple) -> tuple:
    """The sequence whose distributions an edited main sequence is compared with."""
    kind, p, q = main
    return ("B" if kind == "A" else "A", p, q)


def after_system(spans: Spans) -> int:
    """The first token ``add`` edits: the one after the system block (``sys_end+1``; where the
    template has no system role, after the system text, ``sys_last+1``)."""
    a = spans.anchors
    return a["sys_end"] + 1 if "sys_end" in a else a["sys_last"] + 1


def persona_directions(centroids: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``[len(rows), d]`` float32 unit vectors of the personas at ``rows`` of one recipe's
    ``[persona, d]`` centroids, each relative to the mean of every stored persona."""
    return unit(centred(centroids)[rows]).float()


def added_vector(alpha: float, typical_norm: float, u: torch.Tensor) -> torch.Tensor:
    """What ``add`` adds at strength ``alpha``: ``alpha · s_l · u``."""
    return alpha * typical_norm * u


def _kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per read position (float64)."""
    ref, other = ref.double(), other.double()
    return (ref.exp() * (ref - other)).sum(-1).clamp(min=0.0)


def _target_logprob(lp: torch.Tensor, ids: list[int], read: list[int]) -> float:
    """Mean log-prob of the teacher-forced tokens (every read position but the last predicts
    the token after it)."""
    nxt = torch.tensor([ids[t + 1] for t in read[:-1]])
    if not len(nxt):
        return float("nan")
    return float(lp[:-1].gather(-1, nxt[:, None]).mean())


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
    ev = _Eval(runner, store, cfg, targets, by_name[cfg.base], sel_q + score_q)
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
        result.continuations = continuations(ev, result, score_q[0])
    result.seconds = time.perf_counter() - t0
    return result


def _own(ev: _Eval) -> list[tuple[str, int]]:
    """The targets' own vectors as directions, one per target."""
    return [("persona", i) for i in range(len(ev.targets))]


def select_settings(ev: _Eval, questions: list[Question]) -> dict[tuple[str, str], Chosen]:
    """Per (operator, recipe), in operator-then-recipe order, the candidate setting with the
    largest own-vector effect on the selection ``questions`` (every target's own vector on
    every question). All candidates' rows are planned first and run in one pass."""
    cfg, nt, own = ev.cfg, len(ev.targets), _own(ev)
    plan = _Plan()
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
            scored.append((s, _effect(v), float(v[:, 2].mean())))
        s, eff, _ = max(scored, key=lambda x: x[1])
        grid = [x[0].strength for x in scored if x[0].layers == s.layers]
        interior = None if op == "ablate" else min(grid) < s.strength < max(grid)
        curve = [CurvePoint(x.strength, e, g) for x, e, g in scored if x.layers == s.layers]
        chosen[op, r] = Chosen(s, eff, interior, curve)
    return chosen


def score_settings(ev: _Eval, chosen: dict[tuple[str, str], Chosen], questions: list[Question]
                   ) -> tuple[list[RecipeScore], dict[tuple[str, str], np.ndarray]]:
    """Every chosen setting scored on the scoring ``questions`` only: the own vector (with its
    fluency guard), the random directions and, but for ``cap``, the other targets' vectors,
    with bootstrap intervals and the beyond-random test (before Holm and ranks). Also, per
    (operator, recipe), the own vector's edited KL per scoring question ``[question]`` (what
    the ranks compare). Scores in ``chosen``'s order."""
    cfg = ev.cfg
    plan = _Plan()
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


def _plan_scoring(ev: _Eval, plan: _Plan, op: str, r: str, s: Setting,
                  questions: list[Question]) -> None:
    """One setting's scoring rows, per target and question: own, random directions, other
    personas (not for ``cap``), then the own vector's fluency row."""
    nt, own = len(ev.targets), _own(ev)
    for j in range(nt):
        for q in questions:
            arms = [own[j], *(("random", k) for k in range(ev.cfg.n_random))]
            if op != "cap":
                arms += [own[i] for i in range(nt) if i != j]
            for a in arms:
                ev.plan_row(plan, s, r, a, j, q, False)
            ev.plan_row(plan, s, r, own[j], j, q, True)


def _score(ev: _Eval, plan: _Plan, boot: Bootstrap, dir_w: np.ndarray, op: str, r: str,
           c: Chosen, questions: list[Question]) -> tuple[RecipeScore, np.ndarray]:
    """One chosen setting's :class:`RecipeScore` (Holm, beyond-random verdict and rank not yet
    set) from its run rows, and its own vector's edited KL per question ``[question]``."""
    cfg, nt, own = ev.cfg, len(ev.targets), _own(ev)
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
    rand_eff = [_effect(rand[k]) for k in range(cfg.n_random)]
    # the own vector's effect and each direction's, as one formula on the same examples
    test = beyond_random(_effect(mine), rand_eff, cfg.random_test)
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


def _arm(boot: Bootstrap, v: np.ndarray, dir_w: np.ndarray | None = None
         ) -> tuple[Arm, np.ndarray]:
    """``v``: ``[..., question, 4]`` of (kl0, kl, lp gain, fluency)."""
    point, draws = boot.ratio_effect(v[..., 1], v[..., 0], dir_w)
    lp_point, lp_draws = boot.mean(v[..., 2], dir_w)
    wrong = float(np.mean(v[..., 1] > v[..., 0]))
    return Arm(boot.estimate(point, draws), boot.estimate(lp_point, lp_draws), wrong,
               int(np.prod(v.shape[:-1]))), draws


def _effect(v: np.ndarray) -> float:
    """1 - ΣKL(goal || edited) / ΣKL(goal || unedited) over ``v`` ``[..., 4]``'s examples."""
    return float(1 - v[..., 1].sum() / v[..., 0].sum())


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


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


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


# ---------------------------------------------------------------------------------------------
# continuations


@torch.no_grad()
def steered_greedy(runner: Runner, prompts: list[list[int]], edits: list[list[Edit]], n: int
                   ) -> list[list[int]]:
    """Greedy continuations (end-of-turn token dropped), row ``b`` of ``prompts[b]`` with
    ``edits[b]``, in one batch of the static-cache decoder on the bridge's HF model: the edits
    cover the prompt from their start and every generated token, as in an uncached edited
    forward of the whole sequence."""
    from tlpersona.runtime.decode import StaticGreedy

    hf = runner.bridge.original_model
    dec = StaticGreedy(hf, n, runner.eos, runner.pad)
    steer = row_edits(edits, hf.config.hidden_size)
    return [[t for t in ids if t not in runner.eos] for ids in dec(prompts, steer or None)]


def continuations(ev: _Eval, result: SteeringResult, question: Question) -> list[Continuation]:
    """Greedy continuations, as an illustration, with the ``add`` recipe of the largest
    selection-question effect at its selected setting: unsteered
    base, steered, a random direction of equal norm, and the persona itself; each text's mean
    per-token log-prob under the unsteered base model (the fluency of what was generated)."""
    # picked on the selection questions (never on the scoring ones it is shown with)
    best = max(result.scores_for("add"), key=lambda x: x.selection_effect)
    r, s = best.recipe, best.setting
    tok = ev.runner.model.tokenizer
    conv = ev.runner.conversation(ev.prompt(ev.base), question.text)
    n = ev.cfg.continuation_tokens
    targets = ev.targets[: ev.cfg.continuations]
    seq = ("A0", question.id)
    # one batch: base, random direction, then each target steered and each target itself
    prompts = [conv.ids] * (2 + len(targets)) + [
        ev.runner.conversation(ev.prompt(p), question.text).ids for p in targets]
    edits = [[], ev.edits(s, r, ("random", 0), seq),
             *[ev.edits(s, r, ("persona", i), seq) for i in range(len(targets))],
             *[[] for _ in targets]]
    gen = steered_greedy(ev.runner, prompts, edits, n)
    plain, rand = gen[0], gen[1]
    out = []
    for i, p in enumerate(targets):
        steered, own = gen[2 + i], gen[2 + len(targets) + i]
        texts = {"base": plain, "steered": steered, "random": rand, "persona_itself": own}
        rows = [Row(conv.ids + t, list(range(len(conv.ids) - 1, len(conv.ids) + len(t))))
                for t in texts.values()]
        lps = dict(run_rows(ev.runner, rows, len(rows)))
        fl = {k: _target_logprob(lps[i_], rows[i_].ids, rows[i_].read)
              for i_, k in enumerate(texts)}
        out.append(Continuation(p.name, question.text, r, s.label(), tok.decode(plain),
                                tok.decode(steered), tok.decode(rand), tok.decode(own), fl))
    return out
