"""Checks of option values (counts, finite numbers): each raises :class:`TlpersonaError` with
one line naming the option."""

from __future__ import annotations

import math
from collections.abc import Iterable

from tlpersona.errors import TlpersonaError


def check_count(value: int | None, option: str, minimum: int) -> None:
    """An integer option that must be at least ``minimum`` (None means its default)."""
    if value is not None and value < minimum:
        raise TlpersonaError(f"{option} must be at least {minimum}, not {value}")


def check_finite_numbers(values: Iterable[float], option: str) -> None:
    for v in values:
        if not math.isfinite(v):
            raise TlpersonaError(f"{option} must be finite numbers, not {v}")
