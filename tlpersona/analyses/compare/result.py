"""What a recipe comparison found (:func:`tlpersona.analyses.compare.compare`), as typed
members: every layer × recipe pair's statistics beside their nulls and ceilings
(:class:`PairCell`), the paired tests, the split-half floors, the sink and B* checks and the
answer. ``to_dict()`` is results.json, key for key and in its order; ``load`` reads one back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tlpersona.analyses import metrics as M
from tlpersona.analyses.ceilings import Ceiling, CkaCell
from tlpersona.analyses.controls import BStarCheck, FloorReason, FloorStats
from tlpersona.analyses.metrics import HeldOutCos, HeldOutSkipped
from tlpersona.cache.source import ActivationSource, need_source, source_for, stored_layer
from tlpersona.chat.positions import canonical
from tlpersona.infra.resultjson import NOT_JSON, OMIT_NONE, JsonView, Reader, clip, key, num, to_json
from tlpersona.infra.resultsets import read_result, results_set


@dataclass
class Thresholds:
    """PASS needs all of the pass_* bounds exceeded and the mean-centred matrix r beyond its
    Mantel null (p < the comparison's ``alpha``); KILL needs either kill_* bound undercut.

    The spread correlation is descriptive unless ``gate_spread`` is set; then PASS also needs
    spread Spearman > ``pass_spread`` where it is defined.
    """

    pass_min_cos: float = 0.95
    pass_mc_r: float = 0.90
    pass_spread: float = 0.80
    kill_min_cos: float = 0.85
    kill_mc_r: float = 0.70
    gate_spread: bool = False


@dataclass(frozen=True)
class NoiseTest:
    """One missed bound's statistic against what identical recipes reach (its ceiling)."""

    statistic: str  # "min cos" or "mc r"
    observed: float
    ceiling: float | None
    sd: float | None  # its sampling SD over questions (half_sd); None: unknown
    z: float | None  # (observed − ceiling) / sd
    level: float  # one-sided level of "below its ceiling" (alpha over the statistics tested)
    below: bool  # observed below its ceiling beyond sampling error


@dataclass(frozen=True)
class NoiseCheck:
    """Whether a cell that does not pass shows the recipes differ.

    ``mark``: ``"beyond noise"`` where a statistic whose bound the cell misses is below its
    ceiling by more than its sampling error (z < −Φ⁻¹(1 − level)); ``"noise"`` where each is
    within sampling error of it, so identical recipes sampled as noisily could give the cell;
    ``"inconclusive"`` where a missed bound has no ceiling or no sampling error to test
    against (the Mantel gate, the spread, a recipe without per-question vectors). The test does
    not lean on the Mantel p: identical recipes measured noisily on few personas fail the
    Mantel test, and their KILL is then "noise", not a difference."""

    mark: str
    reason: str
    tests: list[NoiseTest]

    def to_dict(self) -> dict[str, Any]:
        return to_json(self)


@dataclass(frozen=True)
class CosStats:
    """A pair's per-persona cosines (mean, min, 5th percentile, max) beside what shuffled
    persona labels give: the mean over every pairing (exact), and the mean and 95th
    percentile of the minimum and of the 5th percentile over the Mantel permutations."""

    mean: float
    min: float
    p5: float
    max: float
    null_mean: float
    null_min_mean: float
    null_min_p95: float
    null_p5_mean: float
    null_p5_p95: float


@dataclass(frozen=True)
class CentredCosStats:
    """Per-persona cosines of the mean-centred centroids, beside their shuffled-label mean."""

    mean: float
    min: float
    p5: float
    max: float
    null_mean: float


@dataclass(frozen=True)
class MatrixStats:
    """Two recipes' inter-persona cosine matrices: Pearson and Spearman r of their upper
    triangles, the Mantel p and null, z (descriptive) and the p Holm-adjusted over every cell
    of the run. All None where a recipe's persona geometry is constant (every persona alike):
    r and its test are undefined there."""

    pearson: float | None
    spearman: float | None
    mantel_p: float | None
    null_mean: float | None
    null_sd: float | None
    null_p95: float | None
    z: float | None
    mantel_p_holm: float | None


@dataclass(frozen=True)
class Spread:
    """Spearman ρ between the two recipes' spread per question (descriptive unless it gates
    the verdict)."""

    spearman: float
    p: float
    n_questions: int
    gates_verdict: bool


@dataclass(frozen=True, kw_only=True)
class SpreadSkipped:
    """Why a pair has no spread correlation."""

    spearman: None = None
    reason: str


#: cells.csv's columns: the :class:`PairCell` attributes, in this order
CSV_COLUMNS = (
    "layer", "x", "y", "tag", "verdict", "within_noise", "noise", "failed", "cos_mean",
    "cos_null_mean", "cos_ceiling", "cos_min", "cos_min_null_p95", "cos_min_ceiling", "cos_p5",
    "cos_p5_null_p95", "mc_cos_mean", "mc_cos_null_mean", "raw_r", "raw_r_null_p95", "raw_r_p",
    "raw_r_p_holm", "mc_r", "mc_r_null_mean", "mc_r_null_p95", "mc_r_z", "mc_r_p",
    "mc_r_p_holm", "mc_r_ceiling", "mc_spearman", "procrustes_cos", "procrustes_null_mean",
    "procrustes_null_p95", "procrustes_z", "procrustes_p", "procrustes_p_holm",
    "procrustes_ceiling", "spread_spearman", "cka_linear", "cka_linear_null_p95",
    "cka_linear_p", "cka_linear_ceiling", "cka_debiased", "cka_debiased_null_p95",
    "cka_debiased_p", "cka_debiased_ceiling")


@dataclass(frozen=True)
class PairCell:
    """One layer × recipe pair of :func:`tlpersona.compare`, each statistic beside its null
    (what unrelated personas give) and ceiling (what the same recipe gives across question
    halves; None where unknown). The flat attributes (``cos_mean``, ``mc_r_p_holm`` …) are
    one row of cells.csv (:data:`CSV_COLUMNS`)."""

    layer: int
    pair: tuple[str, str]
    tag: str  # load-bearing, sanity or other
    per_persona_cos: CosStats
    per_persona_cos_mc: CentredCosStats
    procrustes: HeldOutCos | HeldOutSkipped = field(metadata=key("procrustes_cos"))
    matrix_raw: MatrixStats
    matrix_mc: MatrixStats  # the mean-centred matrices: the verdict's Mantel test
    mantel_p: float | None  # matrix_mc's Mantel p (uncorrected; None: undefined)
    spread: Spread | SpreadSkipped
    ceiling: Ceiling
    verdict: str  # PASS, GREY or KILL
    failed_bounds: list[str] = field(metadata=key("failed"))  # KILL bounds first
    within_noise: bool  # descriptive: every missed bound is missed by its ceiling too
    noise_mark: str | None  # not PASS: "beyond noise", "noise" or "inconclusive"
    noise_test: NoiseCheck | None
    per_persona_cos_all: list[float]
    cka: CkaCell | None = field(default=None, metadata=OMIT_NONE)  # None: results from before CKA

    @property
    def x(self) -> str:
        return self.pair[0]

    @property
    def y(self) -> str:
        return self.pair[1]

    @property
    def noise(self) -> str:
        """The noise mark, "" for PASS."""
        return self.noise_mark or ""

    @property
    def failed(self) -> str:
        """The bounds the verdict missed, "; "-joined."""
        return "; ".join(self.failed_bounds)

    @property
    def cos_mean(self) -> float:
        return self.per_persona_cos.mean

    @property
    def cos_null_mean(self) -> float:
        return self.per_persona_cos.null_mean

    @property
    def cos_ceiling(self) -> float | None:
        return self.ceiling.per_persona_cos_mean

    @property
    def cos_min(self) -> float:
        return self.per_persona_cos.min

    @property
    def cos_min_null_p95(self) -> float:
        """The minimum's 95th percentile over shuffled persona labels."""
        return self.per_persona_cos.null_min_p95

    @property
    def cos_min_ceiling(self) -> float | None:
        return self.ceiling.per_persona_cos_min

    @property
    def cos_p5(self) -> float:
        return self.per_persona_cos.p5

    @property
    def cos_p5_null_p95(self) -> float:
        return self.per_persona_cos.null_p5_p95

    @property
    def mc_cos_mean(self) -> float:
        """Per-persona cosine of the mean-centred centroids."""
        return self.per_persona_cos_mc.mean

    @property
    def mc_cos_null_mean(self) -> float:
        return self.per_persona_cos_mc.null_mean

    @property
    def raw_r(self) -> float | None:
        """Raw cosine-matrix correlation."""
        return self.matrix_raw.pearson

    @property
    def raw_r_null_p95(self) -> float | None:
        return self.matrix_raw.null_p95

    @property
    def raw_r_p(self) -> float | None:
        return self.matrix_raw.mantel_p

    @property
    def raw_r_p_holm(self) -> float | None:
        return self.matrix_raw.mantel_p_holm

    @property
    def mc_r(self) -> float | None:
        """Mean-centred persona-geometry correlation."""
        return self.matrix_mc.pearson

    @property
    def mc_r_null_mean(self) -> float | None:
        return self.matrix_mc.null_mean

    @property
    def mc_r_null_p95(self) -> float | None:
        return self.matrix_mc.null_p95

    @property
    def mc_r_z(self) -> float | None:
        return self.matrix_mc.z

    @property
    def mc_r_p(self) -> float | None:
        """Its uncorrected Mantel p (PASS needs it below the comparison's alpha)."""
        return self.matrix_mc.mantel_p

    @property
    def mc_r_p_holm(self) -> float | None:
        """Holm over every cell of the run."""
        return self.matrix_mc.mantel_p_holm

    @property
    def mc_r_ceiling(self) -> float | None:
        return self.ceiling.matrix_mc_pearson

    @property
    def mc_spearman(self) -> float | None:
        return self.matrix_mc.spearman

    def _held(self) -> HeldOutCos | None:
        return self.procrustes if isinstance(self.procrustes, HeldOutCos) else None

    @property
    def procrustes_cos(self) -> float | None:
        """Held-out Procrustes cosine (None: too few personas)."""
        return self.procrustes.mean

    @property
    def procrustes_null_mean(self) -> float | None:
        held = self._held()
        return None if held is None else held.null_mean

    @property
    def procrustes_null_p95(self) -> float | None:
        held = self._held()
        return None if held is None else held.null_p95

    @property
    def procrustes_z(self) -> float | None:
        held = self._held()
        return None if held is None else held.z

    @property
    def procrustes_p(self) -> float | None:
        """Uncorrected (descriptive unless the run's draws reach Holm)."""
        held = self._held()
        return None if held is None else held.p

    @property
    def procrustes_p_holm(self) -> float | None:
        """None where the draws cannot reach alpha after Holm."""
        held = self._held()
        return None if held is None else held.p_holm

    @property
    def procrustes_ceiling(self) -> float | None:
        return self.procrustes.ceiling

    @property
    def spread_spearman(self) -> float | None:
        return self.spread.spearman

    def _cka(self, kind: str, stat: str) -> float | None:
        if self.cka is None:
            return None
        entry = self.cka.linear if kind == "linear" else self.cka.debiased
        value: float | None = getattr(entry, stat)
        return value

    @property
    def cka_linear(self) -> float | None:
        """Linear CKA of the mean-centred centroids (for comparability; not in the verdict)."""
        return self._cka("linear", "value")

    @property
    def cka_linear_null_p95(self) -> float | None:
        return self._cka("linear", "null_p95")

    @property
    def cka_linear_p(self) -> float | None:
        return self._cka("linear", "p")

    @property
    def cka_linear_ceiling(self) -> float | None:
        """Half size: below what identical recipes reach."""
        return self._cka("linear", "ceiling")

    @property
    def cka_debiased(self) -> float | None:
        """Debiased CKA (unbiased HSIC)."""
        return self._cka("debiased", "value")

    @property
    def cka_debiased_null_p95(self) -> float | None:
        return self._cka("debiased", "null_p95")

    @property
    def cka_debiased_p(self) -> float | None:
        return self._cka("debiased", "p")

    @property
    def cka_debiased_ceiling(self) -> float | None:
        """Full size."""
        return self._cka("debiased", "ceiling")

    def record(self) -> dict[str, object]:
        """The cell as one flat row (cells.csv's columns, :data:`CSV_COLUMNS`)."""
        return {name: getattr(self, name) for name in CSV_COLUMNS}

    def __repr__(self) -> str:
        # a notebook shows this line, not every statistic
        return (f"PairCell(L{self.layer} {self.x} ~ {self.y}: {self.verdict}, cos_mean "
                f"{num(self.cos_mean)}, mc_r {num(self.mc_r)} (Holm p {num(self.mc_r_p_holm)})"
                + (f"; failed: {self.failed}" if self.failed else "") + ")")


@dataclass(frozen=True)
class PairedTest:
    """Whether one pair is more aligned than another pair sharing a recipe at one layer: the
    mean per-persona cosine difference, its sign-flip p and z, Holm over every such test."""

    layer: int
    pair_1: tuple[str, str]
    pair_2: tuple[str, str]
    mean_diff: float
    p: float
    z: float
    p_holm: float


@dataclass(frozen=True)
class RecipeSink:
    """The share of a recipe's between-persona variance along the first token's direction
    (prompt lengths not stored); ``warning`` above
    :data:`~tlpersona.analyses.compare.diagnostics.SINK_WARN`."""

    share: float | None
    warning: bool


@dataclass(frozen=True)
class RecipeSinkLength:
    """As :class:`RecipeSink`, with the correlation of that coordinate with the mean inverse
    prompt length (None where either is constant)."""

    share: float | None
    r_with_inverse_length: float | None
    warning: bool


@dataclass(frozen=True)
class SinkLayer:
    """The attention-sink check at one layer: the first token's mean residual norm and each
    recipe's share (results.json holds them side by side in one object)."""

    sink_norm: float
    recipes: dict[str, RecipeSinkLength | RecipeSink]

    def _to_json(self) -> dict[str, Any]:
        return {"sink_norm": self.sink_norm, **{p: to_json(e) for p, e in self.recipes.items()}}

    @classmethod
    def _from_json(cls, reader: Reader, value: Any, at: str) -> SinkLayer:
        if not isinstance(value, dict) or "sink_norm" not in value:
            reader.fail(at, "is not a sink layer (no sink_norm)")
        entries = reader.build(dict[str, RecipeSinkLength | RecipeSink],
                               {k: v for k, v in value.items() if k != "sink_norm"}, at)
        return cls(reader.build(float, value["sink_norm"], f"{at}.sink_norm"), entries)


@dataclass(frozen=True)
class SinkCheck:
    """The attention-sink diagnostic: ``reason`` where the input has no first-token position,
    else the warning level and per layer :class:`SinkLayer`."""

    available: bool
    reason: str | None = field(default=None, metadata=OMIT_NONE)
    warn_above: float | None = field(default=None, metadata=OMIT_NONE)
    layers: dict[int, SinkLayer] | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True)
class Overall:
    """The comparison's answer: recipe-robust or not, which recipes agree at every layer (and
    per layer), the one-sentence answer and the notes that limit it."""

    recipe_robust: bool
    sentence: str
    partition: list[list[str]]  # recipes agreeing at every layer (every pair passes)
    partition_per_layer: dict[int, list[list[str]]]
    answer: str  # the report's first line (one sentence, with numbers)
    notes: list[str]  # what limits or qualifies the answer (floors, noise, offsets)


@dataclass(frozen=True)
class StoreInput:
    """The store a result was computed on: its manifest hash and provenance."""

    manifest_hash: str
    provenance: dict[str, Any]


@dataclass(frozen=True)
class CompareResult(JsonView):
    """What :func:`tlpersona.compare` found; ``.to_dict()`` is results.json (and
    ``result["cells"]`` its entry). ``cos_matrices[layer][recipe]``: each recipe's mean-centred
    inter-persona cosine matrix ``[persona, persona]`` (what the report draws; not in the JSON).
    ``source``: the store it read (None for a result loaded without it)."""

    inputs: StoreInput = field(metadata=key("input"))
    n_personas: int
    n_questions: int
    personas: list[str]
    layers: list[int]
    positions: list[str]
    n_permutations: int  # Mantel permutations used (sized to the family unless given)
    permutations_auto: bool
    min_attainable_p: float
    min_attainable_p_holm: float  # the smallest Holm-adjusted Mantel p it could reach
    procrustes_corrected: bool  # the held-out Procrustes p is Holm-adjusted
    paired_test: str  # how the paired tests' p-values were computed
    seed: int
    n_splits: int
    n_null: int
    procrustes_splits: int
    alpha: float
    thresholds: Thresholds
    cells: list[PairCell]
    paired_tests: list[PairedTest]
    noise_floor: dict[str, dict[int, FloorStats | FloorReason]]
    bstar: BStarCheck = field(metadata=key("bstar_check"))
    sink: SinkCheck
    missing_rows: dict[str, dict[str, int]]  # recipe -> persona -> rows left out
    overall: Overall
    code_version: str  # the version that computed it
    cos_matrices: dict[int, dict[str, np.ndarray]] = field(
        default_factory=dict, metadata=NOT_JSON, compare=False, repr=False)
    source: ActivationSource | None = field(
        default=None, metadata=NOT_JSON, compare=False, repr=False)

    @property
    def recipe_robust(self) -> bool:
        return self.overall.recipe_robust

    @property
    def sentence(self) -> str:
        return self.overall.sentence

    @property
    def partition(self) -> list[list[str]]:
        """Recipes agreeing at every layer (every pair passes)."""
        return self.overall.partition

    @property
    def answer(self) -> str:
        """The report's first line: do the recipes agree (one sentence, with numbers)."""
        return self.overall.answer

    @property
    def notes(self) -> list[str]:
        """What limits or qualifies the answer (floors, noise, offsets)."""
        return self.overall.notes

    @classmethod
    def of(cls, result: CompareResult | dict[str, Any],
           source: ActivationSource | None) -> CompareResult:
        """``result`` (or its JSON) on ``source``, the store it was computed on."""
        if not isinstance(result, CompareResult):
            result = Reader(None, result.get("code_version")).dataclass(cls, result, "")
        return result.attached(source)

    def attached(self, source: ActivationSource | None) -> CompareResult:
        """This result with the store it was computed on (its cosine matrices read from it)."""
        if source is None or (source is self.source and self.cos_matrices):
            return replace(self, source=source)
        return replace(self, source=source,
                       cos_matrices=centred_cos_matrices(source, self.positions, self.layers))

    @classmethod
    def load(cls, path: str | Path, source: ActivationSource | str | Path | None = None
             ) -> CompareResult:
        """A saved comparison: ``path`` is its results.json or the directory holding it.
        ``source``, the store it was computed on (checked by its manifest hash), is needed
        only for negative layers in :meth:`cell` and for :meth:`save` (its figures)."""
        file, data = read_result(path, "compare")
        result = Reader(file, data.get("code_version")).dataclass(cls, data, "")
        return result.attached(source_for(source, result.inputs.manifest_hash, file))

    def cell(self, layer: int, x: str, y: str) -> PairCell:
        """The cell of recipes ``x`` and ``y`` (names or aliases: ``c2`` is ``sys_end``) at
        ``layer`` (negative: counted from the end of the model)."""
        la = stored_layer(need_source(self.source, "a negative `layer`"), layer) if layer < 0 \
            else layer
        pair = {canonical(x), canonical(y)}
        for c in self.cells:
            if c.layer == la and {c.x, c.y} == pair:
                return c
        raise KeyError((layer, x, y))

    def to_records(self) -> list[dict[str, object]]:
        """One flat row per layer × pair (cells.csv)."""
        return [c.record() for c in self.cells]

    def to_frame(self) -> Any:
        """One row per layer × recipe pair, the columns of cells.csv, as a pandas DataFrame."""
        from tlpersona.infra.resultjson import frame

        return frame(self.to_records())

    def __repr__(self) -> str:
        counts = {v: sum(c.verdict == v for c in self.cells) for v in ("PASS", "GREY", "KILL")}
        return (f"CompareResult({len(self.positions)} recipes × layers {self.layers}, "
                f"{len(self.personas)} personas, {len(self.cells)} cells: "
                + ", ".join(f"{n} {v}" for v, n in counts.items())
                + f"; recipe_robust={self.recipe_robust})\n  {clip(self.answer)}")

    def save(self, out: str | Path, title: str = "Recipe comparison",
             overwrite: bool = False) -> Path:
        """results.json, cells.csv, figures/, report.md and details.md into ``out`` (one set,
        swapped in whole; earlier results there only with ``overwrite``); returns report.md's
        path."""
        from tlpersona.report.compare import write_report
        from tlpersona.report.html import write_html
        from tlpersona.report.tables import write_csv

        if not self.cos_matrices:
            need_source(None, "save (its cosine-matrix figure)")
        with results_set(out, "compare", overwrite, finish=write_html) as stage:
            write_csv(self.to_records(), stage / "cells.csv")
            write_report(self, stage, title)
        return Path(out) / "report.md"


def centred_cos_matrices(source: ActivationSource, positions: list[str], layers: list[int]
                         ) -> dict[int, dict[str, np.ndarray]]:
    """Per layer and recipe, the mean-centred inter-persona cosine matrix ``[persona, persona]``
    (what :func:`compare` keeps on its result for the report's figure)."""
    out = {}
    for layer in layers:
        li = source.layer_index(layer)
        out[layer] = {p: M.cos_matrix(M.mean_centre(source.centroids(p)[:, li].double().numpy()))
                      for p in positions}
    return out
