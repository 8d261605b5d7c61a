"""Typed results of the API calls: the numbers a notebook reads as attributes, ``.to_dict()``
(exactly the JSON the CLI writes) and ``.save(out_dir)`` (JSON, report, figures)."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from tlpersona.analyses.projection import Combined, Nearest
from tlpersona.data import Inputs
from tlpersona.files import atomic_write_bytes, replaced_dir
from tlpersona.interventions.patching import PatchResult as _PatchResult
from tlpersona.interventions.steering import SteeringResult as _SteeringResult
from tlpersona.locks import LOCK_NAME, exclusive
from tlpersona.positions import canonical
from tlpersona.safety import RESULTS_MARK, check_results_dir, mark_results
from tlpersona.sources import ActivationSource, stored_layer
from tlpersona.version import __version__

#: (thread, directory) of the results sets this process is writing: a result saved into one
#: (the experiment's sections) joins that set instead of replacing it.
_OPEN_SETS: set[tuple[int, Path]] = set()


@contextmanager
def results_set(out: str | Path, analysis: str, overwrite: bool) -> Iterator[Path]:
    """The directory to write one results set into, holding ``out``'s lock: ``out``'s new
    content, which takes ``out``'s place whole when the block ends (a failure or a kill leaves
    the earlier set as it was), marked as ``analysis``'s results. ``out`` must be new, empty or
    hold an earlier set (replaced only with ``overwrite``): see
    :func:`tlpersona.safety.check_results_dir`. Inside a set this thread is writing, that
    set's directory itself."""
    out = Path(out)
    if (threading.get_ident(), out.resolve()) in _OPEN_SETS:
        yield out
        return
    check_results_dir(out, overwrite)
    with exclusive(out, "`out`", wait=True):
        check_results_dir(out, overwrite)  # again: the run it waited for may have written there
        with replaced_dir(out, carry=[LOCK_NAME], last=RESULTS_MARK) as stage:
            key = (threading.get_ident(), stage.resolve())
            _OPEN_SETS.add(key)
            try:
                yield stage
            finally:
                _OPEN_SETS.discard(key)
            mark_results(stage, analysis)


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


@dataclass(frozen=True)
class PairCell:
    """One layer × recipe pair of :func:`tlpersona.compare`, each statistic beside its null
    (what unrelated personas give) and ceiling (what the same recipe gives across question
    halves; None where unknown). One row of cells.csv, in this order."""

    layer: int
    x: str
    y: str
    tag: str  # load-bearing, sanity or other
    verdict: str  # PASS, GREY or KILL
    within_noise: bool  # descriptive: every missed bound is missed by its ceiling too
    noise: str  # not PASS: "beyond noise", "noise" or "inconclusive"; "" for PASS
    failed: str  # the bounds the verdict missed ("; "-joined, KILL bounds first)
    cos_mean: float
    cos_null_mean: float
    cos_ceiling: float | None
    cos_min: float
    cos_min_null_p95: float  # the minimum's 95th percentile over shuffled persona labels
    cos_min_ceiling: float | None
    cos_p5: float
    cos_p5_null_p95: float
    mc_cos_mean: float  # per-persona cosine of the mean-centred centroids
    mc_cos_null_mean: float
    raw_r: float  # raw cosine-matrix correlation
    raw_r_null_p95: float
    raw_r_p: float
    raw_r_p_holm: float
    mc_r: float  # mean-centred persona-geometry correlation
    mc_r_null_mean: float
    mc_r_null_p95: float
    mc_r_z: float | None
    mc_r_p: float  # its uncorrected Mantel p (PASS needs it below the comparison's alpha)
    mc_r_p_holm: float  # Holm over every cell of the run
    mc_r_ceiling: float | None
    mc_spearman: float
    procrustes_cos: float | None  # held-out Procrustes cosine (None: too few personas)
    procrustes_null_mean: float | None
    procrustes_null_p95: float | None
    procrustes_z: float | None
    procrustes_p: float | None  # uncorrected (descriptive unless the run's draws reach Holm)
    procrustes_p_holm: float | None  # None where the draws cannot reach alpha after Holm
    procrustes_ceiling: float | None
    spread_spearman: float | None

    @classmethod
    def of(cls, c: dict[str, Any]) -> PairCell:
        s, mcc, raw, mc = (c["per_persona_cos"], c["per_persona_cos_mc"], c["matrix_raw"],
                           c["matrix_mc"])
        proc, ceil = c["procrustes_cos"], c["ceiling"]
        return cls(
            layer=c["layer"], x=c["pair"][0], y=c["pair"][1], tag=c["tag"], verdict=c["verdict"],
            within_noise=bool(c["within_noise"]), noise=c.get("noise_mark") or "",
            failed="; ".join(c["failed"]),
            cos_mean=s["mean"], cos_null_mean=s["null_mean"],
            cos_ceiling=ceil["per_persona_cos_mean"], cos_min=s["min"],
            cos_min_null_p95=s["null_min_p95"], cos_min_ceiling=ceil["per_persona_cos_min"],
            cos_p5=s["p5"], cos_p5_null_p95=s["null_p5_p95"], mc_cos_mean=mcc["mean"],
            mc_cos_null_mean=mcc["null_mean"], raw_r=raw["pearson"], raw_r_null_p95=raw["null_p95"],
            raw_r_p=raw["mantel_p"], raw_r_p_holm=raw["mantel_p_holm"], mc_r=mc["pearson"],
            mc_r_null_mean=mc["null_mean"], mc_r_null_p95=mc["null_p95"], mc_r_z=mc["z"],
            mc_r_p=mc["mantel_p"], mc_r_p_holm=mc["mantel_p_holm"],
            mc_r_ceiling=ceil["matrix_mc_pearson"], mc_spearman=mc["spearman"],
            procrustes_cos=proc.get("mean"), procrustes_null_mean=proc.get("null_mean"),
            procrustes_null_p95=proc.get("null_p95"), procrustes_z=proc.get("z"),
            procrustes_p=proc.get("p"), procrustes_p_holm=proc.get("p_holm"),
            procrustes_ceiling=proc.get("ceiling"), spread_spearman=c["spread"]["spearman"])

    def __repr__(self) -> str:
        # a notebook shows this line, not 37 fields
        return (f"PairCell(L{self.layer} {self.x} ~ {self.y}: {self.verdict}, cos_mean "
                f"{_num(self.cos_mean)}, mc_r {_num(self.mc_r)} (Holm p {_num(self.mc_r_p_holm)})"
                + (f"; failed: {self.failed}" if self.failed else "") + ")")


@dataclass(frozen=True)
class CompareResult:
    """What :func:`tlpersona.compare` found; ``.to_dict()`` is results.json."""

    layers: list[int]
    positions: list[str]
    personas: list[str]
    cells: list[PairCell]
    recipe_robust: bool
    sentence: str
    partition: list[list[str]]  # recipes agreeing at every layer (every pair passes)
    answer: str  # the report's first line: do the recipes agree (one sentence, with numbers)
    notes: list[str]  # what limits or qualifies the answer (floors, noise, offsets)
    n_permutations: int  # Mantel permutations used (sized to the family unless given)
    min_attainable_p_holm: float  # the smallest Holm-adjusted Mantel p this run could reach
    source: ActivationSource = field(repr=False)
    _data: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, data: dict[str, Any], source: ActivationSource) -> CompareResult:
        ov = data["overall"]
        return cls(list(data["layers"]), list(data["positions"]), list(data["personas"]),
                   [PairCell.of(c) for c in data["cells"]], bool(ov["recipe_robust"]),
                   ov["sentence"], [list(g) for g in ov["partition"]], ov["answer"],
                   list(ov["notes"]), int(data["n_permutations"]),
                   float(data["min_attainable_p_holm"]), source, data)

    def cell(self, layer: int, x: str, y: str) -> PairCell:
        """The cell of recipes ``x`` and ``y`` (names or aliases: ``c2`` is ``sys_end``) at
        ``layer`` (negative: counted from the end of the model)."""
        la = stored_layer(self.source, layer) if layer < 0 else layer
        pair = {canonical(x), canonical(y)}
        for c in self.cells:
            if c.layer == la and {c.x, c.y} == pair:
                return c
        raise KeyError((layer, x, y))

    def __repr__(self) -> str:
        counts = {v: sum(c.verdict == v for c in self.cells) for v in ("PASS", "GREY", "KILL")}
        return (f"CompareResult({len(self.positions)} recipes × layers {self.layers}, "
                f"{len(self.personas)} personas, {len(self.cells)} cells: "
                + ", ".join(f"{n} {v}" for v, n in counts.items())
                + f"; recipe_robust={self.recipe_robust})\n  {_clip(self.answer)}")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def save(self, out: str | Path, title: str = "Recipe comparison",
             overwrite: bool = False) -> Path:
        """results.json, cells.csv, figures/, report.md and details.md into ``out`` (one set,
        swapped in whole; earlier results there only with ``overwrite``); returns report.md's
        path."""
        from tlpersona.report.compare import write_report
        from tlpersona.report.tables import write_csv

        with results_set(out, "compare", overwrite) as stage:
            write_csv(self.cells, stage / "cells.csv")
            report = write_report(self._data, self.source, stage, title)
        return Path(out) / report.relative_to(stage)


@dataclass(frozen=True)
class KFound:
    """A held-out shared dimension beside its null: how many leading shared PCs every recipe
    pair orders held-out personas alike on, beyond what relabelled personas reach on the same PC
    (the per-PC test of :mod:`tlpersona.analyses.subspace`). The test calls the layer
    (k ≥ 1); the count beyond 1 is descriptive."""

    k: int | None
    saturated: bool  # every countable PC passed: the subspace may be larger
    null: list[int | None]  # the same count after relabelling one recipe's personas
    null_p: float | None  # (1 + draws reaching k) / (draws + 1); None when k is None
    null_p_holm: float | None  # null_p Holm-adjusted over the layers

    @classmethod
    def of(cls, d: dict[str, Any]) -> KFound:
        return cls(d["k_found"], bool(d["k_found_saturated"]), list(d["k_found_null"]),
                   d["k_found_null_p"], d.get("k_found_null_p_holm"))

    @property
    def beyond_null(self) -> bool:
        """Whether k is beyond its null after Holm over the layers (at 0.05)."""
        from tlpersona.analyses.subspace import ALPHA

        return self.null_p_holm is not None and self.null_p_holm < ALPHA

    def __str__(self) -> str:
        from tlpersona.analyses.subspace import found_text

        return found_text({"k_found": self.k, "k_found_saturated": self.saturated,
                           "k_found_null_p_holm": self.null_p_holm})


@dataclass(frozen=True)
class SubspaceLayer:
    """The shared persona subspace at one layer."""

    layer: int
    k_found: KFound  # the recipes in their own residual basis (joint PCA)
    explained_variance_ratio: list[float]
    # align="procrustes": the same count after rotating the recipes onto a common frame
    aligned: KFound | None = None

    def __repr__(self) -> str:
        return f"SubspaceLayer(L{self.layer}: {self.k_found})"


@dataclass(frozen=True)
class SubspaceResult:
    """What :func:`tlpersona.subspace` found; ``.to_dict()`` is subspace.json."""

    positions: list[str]
    unit_norm: bool
    layers: list[SubspaceLayer]
    answer: str  # the report's line on the shared subspace (one sentence, with numbers)
    components: dict[int, np.ndarray] = field(repr=False)  # layer -> [k, d_model] shared PCs
    source: ActivationSource = field(repr=False)
    _data: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, data: dict[str, Any], components: dict[int, np.ndarray],
           source: ActivationSource) -> SubspaceResult:
        layers = [SubspaceLayer(d["layer"], KFound.of(d), list(d["explained_variance_ratio"]),
                                KFound.of(d["aligned"]) if "aligned" in d else None)
                  for d in data["layers"]]
        from tlpersona.analyses.subspace import answer

        return cls(list(data["positions"]), bool(data["unit_norm"]), layers, answer(data),
                   components, source, data)

    def __repr__(self) -> str:
        per_layer = "; ".join(f"L{la.layer} k_found {la.k_found.k}" for la in self.layers)
        return (f"SubspaceResult({len(self.positions)} recipes; {_clip(per_layer, 100)})\n  "
                f"{_clip(self.answer)}")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """subspace.json, pcs.safetensors, figures/ and subspace.md into ``out`` (one set,
        swapped in whole; earlier results there only with ``overwrite``); returns subspace.md's
        path."""
        from tlpersona.report.subspace import write_subspace

        with results_set(out, "subspace", overwrite) as stage:
            section = write_subspace(self._data, self.components, self.source, stage)
            atomic_write_bytes(stage / "subspace.md", section.encode())
        return Path(out) / "subspace.md"


@dataclass(frozen=True)
class Projected:
    """One stored persona or new item in a projection frame. New items only: ``nearest``, the
    stored personas closest to it and the rank test of its top cosine, Holm-adjusted over every
    new item × recipe of the run (:class:`tlpersona.analyses.projection.Nearest`)."""

    label: str
    recipe: str
    coords: dict[str, float]  # axis name -> coordinate
    stored: bool
    nearest: Nearest | None = None
    text: str = ""  # a new item's system prompt, conversation system message or raw text
    questions: list[str] = field(default_factory=list)  # what a new item was asked (averaged)


@dataclass(frozen=True)
class ProjectionResult:
    """What :func:`tlpersona.project` computed; ``.to_dict()`` is projection.json."""

    store: str
    layer: int
    axis: str
    positions: list[str]
    axes: list[str]  # coordinate names (PC1 …, or the persona axis)
    points: list[Projected]
    inputs: Inputs  # the store's model, personas and questions, and its manifest
    # per new item, its rank test over every recipe at once, Holm over the items
    combined: list[Combined] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        stored: dict[str, list[dict[str, Any]]] = {p: [] for p in self.positions}
        items = []
        for pt in self.points:
            if pt.stored:
                stored[pt.recipe].append({"persona": pt.label, "coords": dict(pt.coords)})
            else:
                near = pt.nearest
                assert near is not None
                items.append({"label": pt.label, "recipe": pt.recipe, "text": pt.text,
                              "questions": list(pt.questions), "coords": dict(pt.coords),
                              "nearest": [{"persona": n, "cos": c} for n, c in near.top],
                              "nearest_rank": near.rank, "nearest_pool": near.pool,
                              "nearest_p": near.p, "nearest_p_holm": near.p_holm,
                              "nearest_tests": near.tests, "nearest_exact": near.exact})
        return {"store": self.store, "inputs": asdict(self.inputs), "layer": self.layer,
                "axis": self.axis, "positions": list(self.positions), "stored": stored,
                "items": items,
                "combined": [{"label": c.label, "recipes": list(c.recipes), "rank": c.rank,
                              "pool": c.pool, "p": c.p, "p_holm": c.p_holm, "tests": c.tests,
                              "exact": c.exact} for c in self.combined],
                "code_version": __version__}

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """projection.json, projection.csv and projection.png into ``out`` (one set, swapped in
        whole; earlier results there only with ``overwrite``); returns the JSON's path."""
        import csv
        import io

        from tlpersona.report import plots

        with results_set(out, "projection", overwrite) as stage:
            atomic_write_bytes(stage / "projection.json", json.dumps(self.to_dict(), indent=1).encode())
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["kind", "label", "recipe", "layer", *self.axes])
            for pt in sorted(self.points, key=lambda p: not p.stored):
                w.writerow(["stored" if pt.stored else "new", pt.label, pt.recipe, self.layer,
                            *(pt.coords[n] for n in self.axes)])
            atomic_write_bytes(stage / "projection.csv", buf.getvalue().encode())
            first = self.axes[0]
            personas = [pt.label for pt in self.points if pt.stored and pt.recipe == self.positions[0]]
            bars = {p: np.array([pt.coords[first] for pt in self.points if pt.stored and pt.recipe == p])
                    for p in self.positions}
            marks = {p: [(pt.label, pt.coords[first]) for pt in self.points
                         if not pt.stored and pt.recipe == p] for p in self.positions}
            plots.ranked_bars(bars, personas, marks, first, self.layer, stage / "projection.png")
        return Path(out) / "projection.json"


@dataclass
class PatchResult(_PatchResult):
    """What :func:`tlpersona.patch` measured (see
    :class:`tlpersona.interventions.patching.PatchResult` for the fields); ``.to_dict()`` is what
    patch.json holds under ``"patching"``."""

    @classmethod
    def of(cls, result: _PatchResult) -> PatchResult:
        return cls(**{f.name: getattr(result, f.name) for f in fields(result)})

    def __repr__(self) -> str:
        return (f"PatchResult({len(self.pairs)} pairs × {len(self.questions)} questions, "
                f"layers {self.layers}, positions {', '.join(self.positions)}, "
                f"{len(self.cells)} cells)\n  {_clip(self.answer())}")

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """patch.json, figures/ and patch.md into ``out`` (one set, swapped in whole; earlier
        results there only with ``overwrite``); returns patch.md's path."""
        from tlpersona.report.patch import write_patch

        with results_set(out, "patch", overwrite) as stage:
            write_patch(self, stage)
        return Path(out) / "patch.md"


@dataclass
class SteeringResult(_SteeringResult):
    """What :func:`tlpersona.steer` found (see
    :class:`tlpersona.interventions.steering.SteeringResult` for the fields)."""

    @classmethod
    def of(cls, result: _SteeringResult) -> SteeringResult:
        return cls(**{f.name: getattr(result, f.name) for f in fields(result)})

    def __repr__(self) -> str:
        return (f"SteeringResult(recipes {', '.join(self.recipes)}, layers {self.layers}, "
                f"operators {', '.join(self.config.operators)}, base {self.base!r})\n  "
                f"{_clip(self.answer())}")

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """steering.json, figures/ and steering.md into ``out`` (one set, swapped in whole;
        earlier results there only with ``overwrite``); returns steering.md's path."""
        from tlpersona.report.steering import write_steering

        with results_set(out, "steering", overwrite) as stage:
            write_steering(self, stage)
        return Path(out) / "steering.md"
