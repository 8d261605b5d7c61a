"""Typed results as CSV: one row per record (``to_records()``), one column per key."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from tlpersona.infra.files import atomic_write_bytes


def write_csv(rows: Sequence[Mapping[str, object]], path: Path) -> Path:
    """``rows``: flat records with the same keys (the columns, in the first row's order); None
    is written as an empty field and floats at full precision (``repr``), so pandas reads back
    the numbers the JSON holds."""
    if not rows:
        raise ValueError("write_csv needs at least one row")
    names = list(rows[0])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in rows:
        w.writerow(["" if (v := r[n]) is None else v for n in names])
    atomic_write_bytes(path, buf.getvalue().encode())
    return path
