"""Drift along an axis, turn by turn and token by token: statistics from arrays (no model).

Every token's residual is projected onto one axis in one recipe's projection frame
(:class:`tlpersona.analyses.projection.Frame`: centred on the stored personas' mean centroid,
so 0 is the average persona); an assistant turn's value is the mean over its content tokens
(the projection of its mean residual, the projection being linear).

A band is where a set of values lies, by order statistics: with ``n`` values sorted,
``lo = x(k_lo)`` and ``hi = x(n + 1 - k_hi)``, ``k = max(1, floor(tail × (n + 1)))`` for the
tails the percentiles leave (5 and 95: 5 % each). For one more value exchangeable with the
``n`` (continuous, no ties), ``P(below lo) = k_lo / (n + 1)`` and ``P(above hi) = k_hi /
(n + 1)`` exactly, so :attr:`Band.outside_rate` is the rate at which a turn like the band's
values is flagged. It is at most the nominal rate where ``n`` allows it, and above it (the band
being the range of the values) where ``n + 1 < 1 / tail``: 12 values give 2 / 13 = 0.15 at
5–95, not 0.10.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tlpersona.analyses.projection import Frame
from tlpersona.errors import TlpersonaError

Side = Literal["below", "inside", "above"]


@dataclass(frozen=True)
class Band:
    """Where ``n`` values lie: ``[lo, hi]`` by order statistics (see the module docstring).
    ``outside_rate``: the probability that one more exchangeable value falls outside."""

    lo: float
    hi: float
    n: int
    k_lo: int
    k_hi: int
    outside_rate: float

    def side(self, value: float) -> Side:
        return "below" if value < self.lo else "above" if value > self.hi else "inside"


def check_percentiles(percentiles: Sequence[float], param: str = "`band`") -> tuple[float, float]:
    """``(lo, hi)`` percentiles with ``0 < lo < hi < 100``."""
    if len(percentiles) != 2:
        raise TlpersonaError(f"{param} must be two percentiles (low, high), not {len(percentiles)}")
    lo, hi = (float(x) for x in percentiles)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi < 100):
        raise TlpersonaError(f"{param} must be two percentiles with 0 < low < high < 100, not "
                             f"{lo:g}, {hi:g}")
    return lo, hi


def band(values: Sequence[float] | np.ndarray, percentiles: tuple[float, float]) -> Band:
    """The band of ``values`` ``[n]`` between ``percentiles`` (low, high) by order statistics."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = int(x.size)
    if n < 2:
        raise TlpersonaError(f"a band needs at least 2 values, not {n}")
    lo_pct, hi_pct = percentiles
    # floor, so the band never holds fewer values than asked for; at least one value outside
    k_lo = max(1, math.floor(lo_pct / 100 * (n + 1) + 1e-9))
    k_hi = max(1, math.floor((100 - hi_pct) / 100 * (n + 1) + 1e-9))
    if k_lo + k_hi > n:  # two values and wide tails: the band is their range
        k_lo = k_hi = 1
    return Band(float(x[k_lo - 1]), float(x[n - k_hi]), n, k_lo, k_hi, (k_lo + k_hi) / (n + 1))


def token_values(frame: Frame, resid: np.ndarray) -> np.ndarray:
    """``resid`` ``[token, d]`` → ``[token]`` float64: each token on the frame's one axis."""
    if frame.basis.shape[0] != 1:
        raise ValueError("a trajectory frame has one axis")
    return frame.coords(np.asarray(resid, dtype=np.float64))[:, 0]


def span_mean(values: np.ndarray, start: int, stop: int) -> float:
    """The mean of ``values[start:stop]`` (one turn's value)."""
    if stop <= start:
        raise ValueError("an empty span has no mean")
    return float(np.mean(values[start:stop], dtype=np.float64))


@dataclass(frozen=True)
class Turn:
    """One assistant turn: its number among the assistant turns (1 …), its message's index, its
    content tokens ``[start, stop)``, its value (the mean over them), and where it lies against
    the stored personas' band and, where the conversation has a stored persona with per-question
    readings, that persona's own band (``own``; None: no own band)."""

    index: int
    message: int
    start: int
    stop: int
    value: float
    stored: Side
    own: Side | None = None


def flag_line(label: str, turn: Turn, persona: str, own: Band, what: str) -> str | None:
    """One line where ``turn`` leaves ``persona``'s own band, else None; ``what`` names the axis,
    layer and recipe."""
    if turn.own is None or turn.own == "inside":
        return None
    return (f"{label} assistant turn {turn.index}: {turn.value:+.4g} is {turn.own} {persona}'s own "
            f"band [{own.lo:+.4g}, {own.hi:+.4g}] ({what}; from its {own.n} per-question "
            f"readings, a turn like them lands outside with probability {own.outside_rate:.2f})")


@dataclass(frozen=True)
class MessageTrace:
    """One message of a conversation as read: its role, text and content tokens ``[start, stop)``."""

    role: str
    content: str
    start: int
    stop: int


@dataclass(frozen=True)
class ConversationTrajectory:
    """One conversation on the axis: every token's value (``values``, beside its id and text),
    every message's span, and every assistant turn. ``persona``: the stored persona its system
    prompt belongs to (None: none known), whose per-question readings give ``own_band`` (None:
    no persona, or a recipe with one reading per persona)."""

    label: str
    persona: str | None
    own_band: Band | None
    messages: list[MessageTrace]
    turns: list[Turn]
    token_ids: list[int]
    tokens: list[str]
    values: list[float]

    def turn_tokens(self, turn: Turn) -> np.ndarray:
        """``[n]`` the values of ``turn``'s tokens."""
        return np.asarray(self.values[turn.start:turn.stop], dtype=np.float64)


def trace(label: str, persona: str | None, own: Band | None, stored: Band,
          messages: Sequence[tuple[str, str, int, int]], ids: Sequence[int],
          tokens: Sequence[str], values: np.ndarray) -> ConversationTrajectory:
    """A conversation's trajectory from its messages ``(role, content, start, stop)`` and its
    tokens' values ``[token]``: each assistant message is a turn, valued at its tokens' mean."""
    turns: list[Turn] = []
    for i, (role, _, start, stop) in enumerate(messages):
        if role != "assistant":
            continue
        value = span_mean(values, start, stop)
        turns.append(Turn(len(turns) + 1, i, start, stop, value, stored.side(value),
                          None if own is None else own.side(value)))
    return ConversationTrajectory(label, persona, own, [MessageTrace(*m) for m in messages], turns,
                                  list(map(int, ids)), list(tokens), [float(v) for v in values])
