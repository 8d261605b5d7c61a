"""Typed results as the JSON their files hold, and back: one writer, one reader.

A result is a tree of dataclasses. :func:`to_json` writes one as a JSON object: its fields in
the order they are declared, each under its own name (or the one its metadata gives,
:func:`key`), dictionary keys as strings, tuples as lists. A field with :data:`OMIT_NONE` is
left out while it is None (keys a file has only sometimes); one with :data:`NOT_JSON` is never
written (what a result carries for its figures, or the store it read). A class whose file
shape is not its fields' writes itself (``_to_json``) and reads itself (``_from_json``).

:class:`Reader` builds a result back from its JSON with the types its fields declare, and
names the file and field of anything it cannot hold. A key it does not know is refused (the
loaded result would not be the saved one), naming the version that wrote the file. The writers
save NaN as null: a float field reads null back as NaN, a field that may be None as None.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

from tlpersona.errors import TlpersonaError
from tlpersona.version import __version__

T = TypeVar("T")


def key(name: str, *, omit_none: bool = False) -> dict[str, object]:
    """Field metadata: written under ``name`` (and, with ``omit_none``, left out while None)."""
    return {"key": name, **({"omit_none": True} if omit_none else {})}


#: Field metadata: left out of the JSON while None (None when the file lacks it)
OMIT_NONE: dict[str, object] = {"omit_none": True}

#: Field metadata: not in the JSON (declare it ``compare=False, repr=False`` with a default)
NOT_JSON: dict[str, object] = {"json": False}


def _key(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("key", f.name))


def _in_json(f: dataclasses.Field[Any]) -> bool:
    return f.metadata.get("json", True) is not False


def to_json(x: Any) -> Any:
    """``x`` as JSON values (see the module docstring); numbers and strings as they are."""
    if is_dataclass(x) and not isinstance(x, type):
        own = getattr(x, "_to_json", None)
        if own is not None:
            return own()
        out = {}
        for f in fields(x):
            if not _in_json(f):
                continue
            value = getattr(x, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[_key(f)] = to_json(value)
        return out
    if isinstance(x, dict):
        return {k if isinstance(k, str) else str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_json(v) for v in x]
    return x


class JsonView(Mapping[str, Any]):
    """A result read as its JSON: ``result["cells"]`` is ``result.to_dict()["cells"]`` (a
    copy), for code written against the results as dicts. Read-only."""

    def _json_fields(self) -> Iterator[dataclasses.Field[Any]]:
        for f in fields(self):  # type: ignore[arg-type]
            if _in_json(f) and not (getattr(self, f.name) is None and f.metadata.get("omit_none")):
                yield f

    def __getitem__(self, key: str) -> Any:
        for f in self._json_fields():
            if _key(f) == key:
                return to_json(getattr(self, f.name))
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (_key(f) for f in self._json_fields())

    def __len__(self) -> int:
        return sum(1 for _ in self._json_fields())

    def to_dict(self) -> dict[str, Any]:
        """The JSON its file holds (see :func:`to_json`)."""
        out = to_json(self)
        assert isinstance(out, dict)
        return out


def clip(text: str, n: int = 160) -> str:
    """``text`` cut to ``n`` characters (a repr's second line)."""
    return text if len(text) <= n else text[: n - 1] + "…"


def num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


@dataclasses.dataclass(frozen=True)
class Reader:
    """Typed values from a result file's JSON, as its dataclasses hold them (tuples, integer
    keys, nested results), with one line naming the file and field of anything it cannot hold.
    ``written_by``: the file's code_version."""

    file: Path | None
    written_by: object = None

    def fail(self, at: str, problem: str) -> NoReturn:
        where = f"{self.file}: " if self.file is not None else ""
        raise TlpersonaError(f"{where}field {at!r} {problem}")

    def unknown(self, at: str) -> NoReturn:
        by = self.written_by
        self.fail(at, f"is unknown to tlpersona {__version__}"
                  + (f" (the file was written by tlpersona {by}: load it with that version)"
                     if by is not None and by != __version__ else ""))

    def build(self, tp: Any, value: Any, at: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (types.UnionType, typing.Union):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1:
                return self.build(inner[0], value, at)
            return self.dataclass(self.variant(inner, value, at), value, at)
        if is_dataclass(tp):
            return self.dataclass(tp, value, at)  # type: ignore[arg-type]
        if origin is list:
            return [self.build(args[0], v, f"{at}[{i}]") for i, v in enumerate(self.array(value, at))]
        if origin is tuple:
            items = self.array(value, at)
            kinds = [args[0]] * len(items) if args[1:] == (...,) else list(args)
            if len(kinds) != len(items):
                self.fail(at, f"has {len(items)} entries, not {len(kinds)}")
            pairs = enumerate(zip(kinds, items, strict=True))
            return tuple(self.build(t, v, f"{at}[{i}]") for i, (t, v) in pairs)
        if origin is dict:
            if not isinstance(value, dict):
                self.fail(at, "is not an object")
            return {self.key(args[0], k, at): self.build(args[1], v, f"{at}[{k!r}]")
                    for k, v in value.items()}
        if origin is Literal:
            if value not in args:
                self.fail(at, f"is {value!r}, not one of {', '.join(map(repr, args))}")
            return value
        return self.leaf(tp, value, at)

    def variant(self, kinds: list[Any], value: Any, at: str) -> Any:
        """Of dataclasses that share a place in the file (a statistic, or why it is missing),
        the one whose keys ``value`` has: each of its required keys and none it lacks."""
        if not isinstance(value, dict):
            self.fail(at, "is not an object")
        for tp in kinds:
            keys = {_key(f): f for f in fields(tp) if f.init and _in_json(f)}
            required = {k for k, f in keys.items()
                        if f.default is MISSING and f.default_factory is MISSING}
            if required <= set(value) <= set(keys) | _derived(tp):
                return tp
        self.fail(at, f"matches none of {', '.join(t.__name__ for t in kinds)} "
                  f"(keys {', '.join(value)})")

    def array(self, value: Any, at: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(at, "is not a list")
        return value

    def key(self, tp: Any, key: str, at: str) -> Any:
        # JSON keys are strings: integer keys (layers) were written as their digits
        if tp is int:
            try:
                return int(key)
            except ValueError:
                self.fail(at, f"has key {key!r}, not an integer")
        return key

    def leaf(self, tp: Any, value: Any, at: str) -> Any:
        if tp is Any:
            return value
        if tp is float:
            if value is None:  # the writers store NaN and infinities as null
                return math.nan
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            self.fail(at, f"is {value!r}, not a number")
        if tp in (bool, str) and isinstance(value, tp):
            return value
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if tp is type(None) and value is None:
            return None
        self.fail(at, f"is {value!r}, not {getattr(tp, '__name__', tp)}")

    def dataclass(self, tp: type[T], value: Any, at: str) -> T:
        """``tp`` from the object ``value``; a missing field with a default takes it. A key
        naming one of ``tp``'s properties is what the class recomputes: checked to be there
        and not kept."""
        own = getattr(tp, "_from_json", None)
        if own is not None:
            return own(self, value, at)
        if not isinstance(value, dict):
            self.fail(at, "is not an object")
        hints = typing.get_type_hints(tp)
        known = {_key(f): f for f in fields(tp) if f.init and _in_json(f)}  # type: ignore[arg-type]
        extra = [k for k in value if k not in known and k not in _derived(tp)]
        if extra:
            self.unknown(f"{at}.{extra[0]}" if at else extra[0])
        kwargs = {}
        for key, f in known.items():
            where = f"{at}.{key}" if at else key
            if key in value:
                kwargs[f.name] = self.build(hints[f.name], value[key], where)
            elif f.default is MISSING and f.default_factory is MISSING:
                self.fail(where, "is missing")  # a field with a default: a file of an older version
        return tp(**kwargs)

    def object(self, value: Any, at: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The keys of ``spec`` (key -> type) from the object ``value``, each typed; no other
        key, none missing. For a class that reads its own shape (``_from_json``)."""
        if not isinstance(value, dict):
            self.fail(at, "is not an object")
        extra = [k for k in value if k not in spec]
        if extra:
            self.unknown(f"{at}.{extra[0]}" if at else extra[0])
        out = {}
        for key, tp in spec.items():
            where = f"{at}.{key}" if at else key
            if key not in value:
                self.fail(where, "is missing")
            out[key] = self.build(tp, value[key], where)
        return out


def _derived(tp: type) -> set[str]:
    """The properties of ``tp``: values its file holds that the class recomputes."""
    return {name for name in dir(tp) if isinstance(getattr(tp, name, None), property)}


def _flat(value: Any, prefix: str, row: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}" if prefix else k, row)
    elif not isinstance(value, list):
        row[prefix] = value
    elif all(not isinstance(v, dict | list) for v in value):
        row[prefix] = tuple(value)  # a cell each: per-question values, a setting's layers
    # lists of objects (curves, examples) stay in to_dict()


def frame(rows: typing.Iterable[Any]) -> Any:
    """A pandas DataFrame with one row per item of ``rows`` (dataclasses or mappings): their
    JSON fields (:func:`to_json`), nested objects as ``outer.inner`` columns, lists of numbers
    or names as a tuple per cell; lists of objects are left out (they stay in the result's
    ``to_dict()``). pandas comes with transformer-lens; this is the one place tlpersona uses
    it."""
    try:
        import pandas
    except ImportError:
        raise TlpersonaError("to_frame needs pandas: pip install pandas") from None
    out = []
    for item in rows:
        row: dict[str, Any] = {}
        _flat(to_json(item), "", row)
        out.append(row)
    return pandas.DataFrame(out)
