"""The options of a steering run and their checks: :class:`SteerConfig`, the candidate
:class:`Setting` (operator, layers, strength), the default strength grids, and every refusal
made before a forward pass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tlpersona.cache.source import ActivationSource
from tlpersona.errors import TlpersonaError
from tlpersona.interventions.selection import default_recipes
from tlpersona.interventions.steering.bootstrap import RANDOM_TESTS
from tlpersona.runtime.edits import OPERATORS

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
