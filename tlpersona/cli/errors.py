"""Errors a user can cause, as the CLI shows them: :class:`TlpersonaError` printed as one line,
exit code 2. The library names parameters in backticks (`batch_size`); here they become the
flags that set them (--batch-size).
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Any

import click

from tlpersona.errors import TlpersonaError

#: API parameter -> flag, where a command's flag is not the parameter's own name.
_RENAMED = {"seed_dir": "--from-seed", "format": "--vectors", "systems": "--system",
            "texts": "--text"}


def flags(message: str) -> str:
    """``message`` with every backticked parameter name written as the current command's flag
    for it (or as the bare name where the command has none)."""
    names = dict(_RENAMED)
    ctx = click.get_current_context(silent=True)
    for param in ctx.command.params if ctx else []:
        if isinstance(param, click.Option):
            for opt in param.opts:
                if opt.startswith("--"):
                    names[opt[2:].replace("-", "_")] = opt
        elif param.name:
            names[param.name] = param.name.upper()
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: names.get(m[1], m[1]), message)


def friendly(fn: Any) -> Any:
    """``fn`` with a :class:`TlpersonaError` shown as one line, ``error: …`` on stderr, and exit
    code 2 (a traceback is for bugs, not for a bad option)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TlpersonaError as exc:
            click.echo(f"error: {flags(str(exc))}", err=True)
            sys.exit(2)

    return wrapper

