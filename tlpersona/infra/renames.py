"""Earlier names of configuration fields, kept for one release: each old name reads the field
it became and is still accepted by the constructor (with a DeprecationWarning)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def old_names(renames: dict[str, str]) -> Callable[[type[T]], type[T]]:
    """Class decorator, above ``@dataclass`` (whose ``InitVar`` fields take the old names in
    the constructor): each old name becomes a read-only property of the field it names."""
    def wrap(cls: type[T]) -> type[T]:
        setattr(cls, "_renames", dict(renames))  # noqa: B010 (type[T] has no such attribute)
        for old, new in renames.items():
            setattr(cls, old, property(_reader(new), doc=f"The earlier name of ``{new}`` (read-only)."))
        return cls
    return wrap


def _reader(name: str) -> Callable[[Any], Any]:
    def read(self: Any) -> Any:
        return getattr(self, name)
    return read


def take_old_names(cfg: Any, given: dict[str, object]) -> None:
    """Set the fields that ``given`` (old name -> value; None: not given) names by their old
    names, from ``__post_init__``."""
    renames: dict[str, str] = type(cfg)._renames
    for old, value in given.items():
        if value is not None:
            warnings.warn(f"`{old}` is now `{renames[old]}`", DeprecationWarning, stacklevel=4)
            setattr(cfg, renames[old], value)
