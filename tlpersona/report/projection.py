"""Files and figure of a projection result."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from tlpersona.analyses.projection import ProjectionResult
from tlpersona.infra.files import atomic_write_bytes
from tlpersona.report import plots


def write_projection(result: ProjectionResult, out: Path) -> None:
    """projection.json, projection.csv (one row per point and recipe) and projection.png (the
    stored personas ranked on the first coordinate, new items marked) into ``out``."""
    # a bare NaN, as written so far (the strict writer would write null)
    atomic_write_bytes(out / "projection.json", json.dumps(result.to_dict(), indent=1).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "label", "recipe", "layer", *result.axes])
    for pt in sorted(result.points, key=lambda p: not p.stored):
        w.writerow(["stored" if pt.stored else "new", pt.label, pt.recipe, result.layer,
                    *(pt.coords[n] for n in result.axes)])
    atomic_write_bytes(out / "projection.csv", buf.getvalue().encode())
    first = result.axes[0]
    personas = [pt.label for pt in result.points if pt.stored and pt.recipe == result.positions[0]]
    bars = {p: np.array([pt.coords[first] for pt in result.points if pt.stored and pt.recipe == p])
            for p in result.positions}
    marks = {p: [(pt.label, pt.coords[first]) for pt in result.points
                 if not pt.stored and pt.recipe == p] for p in result.positions}
    plots.ranked_bars(bars, personas, marks, first, result.layer, out / "projection.png")
