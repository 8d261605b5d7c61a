"""The typed result of a steering run and its parts: one score per operator × recipe (its
setting, arms, examples and curve), the continuations, and steering.json written and read
back."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tlpersona.data import Inputs
from tlpersona.interventions.selection import PersonaChoice
from tlpersona.interventions.steering.bootstrap import Estimate
from tlpersona.interventions.steering.config import Setting, SteerConfig
from tlpersona.interventions.steering.verdict import answer_text
from tlpersona.version import __version__


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
    random_t_p: float | None = None  # one-sided t-prediction p (bootstrap.t_prediction_p)
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
        return answer_text(self, op)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
