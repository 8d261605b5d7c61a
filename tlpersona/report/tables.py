"""Typed results as CSV: one row per result object, one column per dataclass field."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlpersona.files import atomic_write_bytes


def write_csv(rows: Sequence[Any], path: Path) -> Path:
    """``rows``: dataclass instances of one type; None is written as an empty field and floats
    at full precision (``repr``), so pandas reads back the numbers the JSON holds."""
    if not rows:
        raise ValueError("write_csv needs at least one row")
    names = [f.name for f in dataclasses.fields(rows[0])]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in rows:
        w.writerow(["" if (v := getattr(r, n)) is None else v for n in names])
    atomic_write_bytes(path, buf.getvalue().encode())
    return path
