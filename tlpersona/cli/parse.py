"""String parsing, the only place it happens: option values as typed on the command line
become the typed values the API takes. A value that does not parse is a :class:`TlpersonaError`
naming the parameter in backticks (shown as its flag)."""

from __future__ import annotations

from typing import Any, Literal

import click

from tlpersona.errors import TlpersonaError


def prompt_index(value: str) -> int | Literal["all"]:
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise TlpersonaError(f"`prompt_index` must be an integer or 'all', not {value!r}") from None


def batch_size(value: str) -> int | None:
    """``auto`` (None: sized from free GPU memory) or a positive integer."""
    if value == "auto":
        return None
    try:
        size = int(value)
    except ValueError:
        raise TlpersonaError(f"`batch_size` must be a positive integer or 'auto', not {value!r}") from None
    if size < 1:
        raise TlpersonaError("`batch_size` must be at least 1")
    return size


def items(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def layers(value: str | None, default: Any = "default") -> Any:
    """One layer syntax for every command: ``default``, ``all``, or comma-separated block
    indices (negative from the end)."""
    if value is None:
        return default
    if value in ("default", "all"):
        return value
    try:
        return [int(x) for x in items(value)]
    except ValueError:
        raise TlpersonaError(f"bad `layers` {value!r}: block indices (e.g. 7,14,-1), 'default' "
                             "or 'all'") from None


def stored_layers(value: str | None) -> list[int] | None:
    """``--layers`` of a command that reads a store: every stored layer by default or ``all``."""
    got = layers(value, None)
    if got in (None, "all"):
        return None
    if got == "default":
        raise TlpersonaError("`layers` default means every stored layer here: leave it out")
    return got


def numbers(value: str, name: str) -> list[float]:
    try:
        return [float(a) for a in items(value)]
    except ValueError:
        raise TlpersonaError(f"`{name}` must be comma-separated numbers, not {value!r}") from None


def personas(spec: str, limit: int | None = None, param: str = "personas") -> Any:
    from tlpersona.data import load_personas

    return load_personas(spec, limit, param)


def questions(spec: str, limit: int | None = None) -> Any:
    from tlpersona.data import load_questions

    return load_questions(spec, limit)


def stored_layers_pair(value: str | None, name: str) -> list[int] | None:
    """``--layers-a`` / ``--layers-b``: comma-separated block indices (negative from the end)."""
    if value is None:
        return None
    try:
        return [int(x) for x in items(value)]
    except ValueError:
        raise TlpersonaError(f"bad `{name}` {value!r}: block indices (e.g. 7,14,-1)") from None


class _AutoCount(click.ParamType):
    """A count or ``auto`` (None: the library sizes it)."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return None
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a whole number", param, ctx)


AUTO_COUNT = _AutoCount()
