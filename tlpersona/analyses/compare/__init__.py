"""Recipe comparison: one cell per layer × pair of positions, with verdicts.

Input is any source with the store's read interface (:class:`tlpersona.cache.Store` or the seed
layout's :class:`tlpersona.cache.seed_layout.SeedSource`). :func:`compare` runs the stages in
order: the per-question pass and each layer's cells (:mod:`.cells`), Holm over every cell of the
run, the verdicts and the answer (:mod:`.verdicts`), the B*, sink and missing-row checks
(:mod:`.diagnostics`). What it returns is :class:`~.result.CompareResult`.
"""

from __future__ import annotations

import math
import time
from dataclasses import InitVar, dataclass, field, replace

import numpy as np

from tlpersona.analyses import metrics as M
from tlpersona.analyses.compare.cells import (
    PairedRow,
    UnadjustedCell,
    adjusted,
    layer_cells,
    paired_holm,
    paired_tests,
    per_question_pass,
)
from tlpersona.analyses.compare.diagnostics import missing_rows, sink_diagnostic
from tlpersona.analyses.compare.result import CompareResult, StoreInput, Thresholds
from tlpersona.analyses.compare.verdicts import mantel_floor, overall
from tlpersona.analyses.controls import bstar_check
from tlpersona.analyses.stats import EXACT_SIGN_FLIP_MAX, MantelPermuter, draws_for_family
from tlpersona.cache.source import ActivationSource
from tlpersona.chat.positions import RECIPES, canonical
from tlpersona.errors import TlpersonaError
from tlpersona.infra.renames import old_names, take_old_names
from tlpersona.version import __version__

__all__ = ["CompareConfig", "CompareResult", "compare"]


@old_names({"n_perm": "permutations", "n_splits": "splits", "n_null": "null_draws"})
@dataclass
class CompareConfig:
    """What :func:`compare` computes; ``permutations``, ``splits`` and ``null_draws`` are the
    names :func:`tlpersona.compare` takes (``n_perm``, ``n_splits`` and ``n_null``, their
    earlier names, still read and set them for one release)."""

    positions: list[str] | None = None  # default: the recipes present in the source
    layers: list[int] | None = None  # default: every stored layer
    # Mantel permutations; None: sized to the family (draws_for_family)
    permutations: int | None = None
    seed: int = 0
    splits: int = 10  # question halvings behind the split-half ceilings
    thresholds: Thresholds = field(default_factory=Thresholds)
    null_draws: int = 100  # relabelled draws behind the held-out Procrustes null (descriptive
    # unless enough for Holm over the cells: see procrustes_corrected)
    alpha: float = 0.05  # family-wise level for the report's "above the null" statements
    n_perm: InitVar[int | None] = None
    n_splits: InitVar[int | None] = None
    n_null: InitVar[int | None] = None

    def __post_init__(self, n_perm: int | None, n_splits: int | None,
                      n_null: int | None) -> None:
        take_old_names(self, {"n_perm": n_perm, "n_splits": n_splits, "n_null": n_null})


#: Positions compared by default besides the seven recipes, when the input has them.
EXTRA_DEFAULT = ("prompt_mean_no_first", "response_mean_seed")


def default_positions(available: list[str]) -> list[str]:
    """The seven recipes, the sink-free prompt mean and the seed's response span, that
    ``available`` holds."""
    return [p for p in [*RECIPES.values(), *EXTRA_DEFAULT] if p in available]


def compare(source: ActivationSource, cfg: CompareConfig | None = None,
            timings: dict[str, float] | None = None) -> CompareResult:
    """Every metric for every layer × pair, each with its null (and ceiling where it has one),
    as a :class:`CompareResult` (``to_dict()``: results.json). ``timings``: wall seconds per
    stage, added into it."""
    cfg = cfg or CompareConfig()
    th = cfg.thresholds
    positions, layers = compared(source, cfg)
    n = len(source.personas)
    clock = StageClock(timings)
    n_cells = math.comb(len(positions), 2) * len(layers)
    # the Mantel family is every cell: enough permutations that Holm over it can reach alpha
    n_perm = (cfg.permutations if cfg.permutations is not None
              else draws_for_family(n_cells, cfg.alpha))
    permuter = MantelPermuter(n, n_perm, cfg.seed)
    # Per-question work first, one recipe at a time, streamed over personas: its vectors (GBs
    # at full scale) are read once for all layers.
    per_q = per_question_pass(source, positions, layers, cfg.splits, cfg.seed, permuter.iu, clock)
    cells: list[UnadjustedCell] = []
    paired: list[PairedRow] = []
    cos_matrices: dict[int, dict[str, np.ndarray]] = {}
    for layer in layers:
        clock.start()
        at = layer_cells(source, layer, positions, permuter, per_q, cfg, clock)
        cells += at.cells
        cos_matrices[layer] = at.cos_matrices
        paired += paired_tests(layer, at.per_persona_cos)
        clock.tick("paired tests")

    # The Procrustes null costs a full refit per draw (minutes per 100 at full scale), so by
    # default it is descriptive: Holm is applied only when its draws can reach alpha over the
    # cells; the corrected claim "geometry beyond chance" is the Mantel test's.
    procrustes_corrected = n_cells / (cfg.null_draws + 1) < cfg.alpha
    pair_cells = adjusted(cells, th, cfg.alpha, procrustes_corrected)
    paired_adjusted = paired_holm(paired)
    clock.start()
    bstar = bstar_check(source, layers)
    clock.tick("B* check")
    sink = sink_diagnostic(source, positions, layers)
    missing_rows_ = missing_rows(source, positions)
    return CompareResult(
        inputs=StoreInput(source.manifest_hash, source.provenance),
        n_personas=n,
        n_questions=len(source.questions),
        personas=list(source.personas),
        layers=layers,
        positions=positions,
        n_permutations=n_perm,
        permutations_auto=cfg.permutations is None,
        min_attainable_p=1.0 / (n_perm + 1),
        min_attainable_p_holm=min(1.0, mantel_floor(n, n_perm) * n_cells),
        procrustes_corrected=procrustes_corrected,
        paired_test=("exact sign-flip enumeration" if n <= EXACT_SIGN_FLIP_MAX else
                     "Bentkus–Dzindzalieta bound on the sign-flip tail"),
        seed=cfg.seed,
        n_splits=cfg.splits,
        n_null=cfg.null_draws,
        procrustes_splits=M.PROCRUSTES_SPLITS,
        alpha=cfg.alpha,
        thresholds=replace(th),
        cells=pair_cells,
        paired_tests=paired_adjusted,
        noise_floor=per_q.floors,
        bstar=bstar,
        sink=sink,
        missing_rows=missing_rows_,
        overall=overall(pair_cells, positions, layers, th, cfg.alpha, n, n_perm, cfg.null_draws,
                        procrustes_corrected),
        code_version=__version__,
        cos_matrices=cos_matrices,
        source=source,
    )


def compared(source: ActivationSource, cfg: CompareConfig) -> tuple[list[str], list[int]]:
    """The positions (canonical names) and layers :func:`compare` compares, checked against
    ``source``: every position and layer stored, at least two positions and four personas."""
    positions = ([canonical(p) for p in cfg.positions] if cfg.positions
                 else default_positions(list(source.positions)))
    missing = [p for p in positions if p not in source.positions]
    if missing:
        raise TlpersonaError(f"position {missing[0]} is not in the input")
    if len(positions) < 2:
        raise TlpersonaError("comparison needs at least two positions")
    layers = cfg.layers or list(source.layers)
    for layer in layers:
        source.layer_index(layer)
    n = len(source.personas)
    if n < 4:
        raise TlpersonaError(f"comparison needs at least 4 personas, got {n}")
    return positions, layers


class StageClock:
    """Wall seconds per named stage, summed into ``timings`` (a fresh dict where None): each
    :meth:`tick` charges the time since the last tick or :meth:`start` to its stage."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings if timings is not None else {}
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def tick(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.t0
        self.t0 = now
