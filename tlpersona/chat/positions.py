"""Named token positions in a chat-templated conversation.

A position is parsed once from its name (``sys_end+1``, ``prompt_mean``, ``c3`` …) and resolved
per conversation against the token spans that :mod:`tlpersona.chat.template` finds.

Kinds of position:

* anchored: an anchor token plus an integer offset (``sys_end+1``, ``last-2``). Anchors:
  ``first`` (token 0, the same for every prompt: the attention sink's residual),
  ``last`` (final prompt token, generation prompt included), ``sys_start``/``sys_last`` (first/last
  token of the system text), ``sys_end`` (the system block's end-of-turn token), ``user_start``/
  ``user_last``/``user_end`` (likewise for the user turn), ``resp_start`` (first response token).
* pooled: ``prompt_mean`` (mean over every prompt token), ``prompt_mean_no_last`` (all but the
  last), ``prompt_mean_no_first`` (all but token 0, whose residual norm can be two orders above
  the rest and then dominates ``prompt_mean``), ``response_mean`` (mean over the generated response
  tokens; the end-of-turn token only with ``include_eot``), ``response_mean_seed`` (the seed
  experiment's span: the response tokens followed by the tokens the chat template closes an
  assistant turn with, for ChatML ``<|im_end|>`` and ``\n``; see :meth:`ChatRenderer.turn_close`).
* ``raw_system_last``: the system text tokenised alone (no template, no BOS), last token.

Recipe aliases are accepted on input only; stored names are canonical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tlpersona.errors import TlpersonaError

if TYPE_CHECKING:
    from tlpersona.chat.template import Spans

ANCHORS = (
    "first",
    "last",
    "sys_start",
    "sys_last",
    "sys_end",
    "user_start",
    "user_last",
    "user_end",
    "resp_start",
)
POOLED = ("prompt_mean", "prompt_mean_no_last", "prompt_mean_no_first", "response_mean",
          "response_mean_seed")
RAW = "raw_system_last"

#: Anchors that lie before the user turn; in a causal model they cannot see the question.
SYSTEM_ANCHORS = frozenset({"first", "sys_start", "sys_last", "sys_end"})

#: Recipe letter -> canonical position, in the order the recipes are usually listed.
RECIPES: dict[str, str] = {
    "a": "last",
    "b": "response_mean",
    "bstar": "prompt_mean",
    "bstar_no_last": "prompt_mean_no_last",
    "c1": "raw_system_last",
    "c2": "sys_end",
    "c3": "sys_end+1",
}
_ALIASES = {**RECIPES, "b*": "prompt_mean", "b*_no_last": "prompt_mean_no_last",
            "bstar_no_first": "prompt_mean_no_first", "b*_no_first": "prompt_mean_no_first",
            "b_seed": "response_mean_seed"}
_GROUPS = {"all6": list(RECIPES.values()), "recipes": list(RECIPES.values())}
_ANCHORED = re.compile(r"^(?P<anchor>[a-z_]+?)(?:(?P<sign>[+-])(?P<off>\d+))?$")


@dataclass(frozen=True)
class Position:
    """One parsed position. ``kind`` is ``anchored``, ``pooled`` or ``raw``."""

    kind: str
    anchor: str
    offset: int = 0

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``sys_end+1``."""
        if self.kind != "anchored" or self.offset == 0:
            return self.anchor
        return f"{self.anchor}{self.offset:+d}"

    @property
    def question_invariant(self) -> bool:
        """True when the value cannot depend on the question (system block, or raw system text).

        Extraction checks, per persona, that an invariant position really resolves inside the
        prefix shared by all questions (an offset could push it into the user turn).
        """
        return self.kind == "raw" or (self.kind == "anchored" and self.anchor in SYSTEM_ANCHORS)

    @property
    def needs_response(self) -> bool:
        return self.anchor in ("response_mean", "response_mean_seed", "resp_start")

    def __str__(self) -> str:
        return self.name

    def resolve(self, spans: Spans) -> tuple[int, int]:
        """Half-open token range ``[start, stop)`` that this position pools over in one sequence.

        Anchored positions give a range of length one. Raises :class:`TlpersonaError` when the
        anchor does not exist for this template or the offset leaves the sequence.
        """
        if self.kind == "raw":
            raise TlpersonaError(f"{self.name} is read from a separate run of the system text")
        if self.kind == "pooled":
            if self.anchor == "prompt_mean":
                return 0, spans.prompt_len
            if self.anchor == "prompt_mean_no_last":
                if spans.prompt_len < 2:
                    raise TlpersonaError("prompt_mean_no_last needs a prompt of at least 2 tokens")
                return 0, spans.prompt_len - 1
            if self.anchor == "prompt_mean_no_first":
                if spans.prompt_len < 2:
                    raise TlpersonaError("prompt_mean_no_first needs a prompt of at least 2 tokens")
                return 1, spans.prompt_len
            if self.anchor == "response_mean_seed":
                if spans.turn_stop is None:
                    raise TlpersonaError("response_mean_seed needs the chat template's closing "
                                         "tokens after the response")
                return spans.prompt_len, spans.turn_stop
            start, stop = spans.response
            if stop <= start:
                raise TlpersonaError("response_mean: the response is empty")
            return start, stop
        base = 0 if self.anchor == "first" else spans.anchor(self.anchor)
        idx = base + self.offset
        limit = spans.seq_len
        if not 0 <= idx < limit:
            raise TlpersonaError(
                f"position {self.name} resolves to token {idx}, outside the sequence of "
                f"{limit} tokens"
            )
        return idx, idx + 1


def parse_position(text: str) -> Position:
    """Parse one position name or alias (case-insensitive)."""
    key = text.strip().lower()
    key = _ALIASES.get(key, key)
    if key in POOLED:
        return Position("pooled", key)
    if key == RAW:
        return Position("raw", key)
    match = _ANCHORED.match(key)
    if match and match["anchor"] in ANCHORS:
        sign = -1 if match["sign"] == "-" else 1
        return Position("anchored", match["anchor"], sign * int(match["off"] or 0))
    known = ", ".join([*ANCHORS, *POOLED, RAW, *_ALIASES, *_GROUPS])
    raise TlpersonaError(f"unknown position {text.strip()!r} (known: {known}; offsets like sys_end+1)")


def parse_positions(spec: str | list[str]) -> list[Position]:
    """Parse a comma-separated spec (``last,sys_end,sys_end+1``, ``all6``) into unique positions."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Position] = []
    for item in items:
        if not item.strip():
            continue
        expanded = _GROUPS.get(item.strip().lower(), [item])
        for name in expanded:
            pos = parse_position(name)
            if pos not in out:
                out.append(pos)
    if not out:
        raise TlpersonaError("no positions given")
    return out


def canonical(name: str) -> str:
    """Canonical name of a position or alias: ``c3`` -> ``sys_end+1``."""
    return parse_position(name).name
