"""Six-way recipe comparison: one cell per layer × pair of positions, with verdicts.

Input is any source with the store's read interface (:class:`tlpersona.cache.Store` or the seed
layout's :class:`tlpersona.cache.seed_layout.SeedSource`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field, replace

import numpy as np
import torch
from scipy import stats

from tlpersona.analyses import metrics as M
from tlpersona.analyses.ceilings import CkaReliability, Halves, ceiling, cka_cell, cka_reliability, mc_r_sd
from tlpersona.analyses.compare_result import (
    Ceiling,
    CentredCosStats,
    CkaCell,
    CompareResult,
    CosStats,
    MatrixStats,
    NoiseCheck,
    NoiseTest,
    Overall,
    PairCell,
    PairedTest,
    RecipeSink,
    RecipeSinkLength,
    SinkCheck,
    SinkLayer,
    Spread,
    SpreadSkipped,
    StoreInput,
    Thresholds,
)
from tlpersona.analyses.controls import (
    CHUNK,
    FloorReason,
    FloorStats,
    bstar_check,
    floor_stats,
    half_centroids,
    split_masks,
)
from tlpersona.analyses.metrics import HeldOutCos, HeldOutSkipped
from tlpersona.analyses.stats import (
    EXACT_SIGN_FLIP_MAX,
    MantelPermuter,
    MantelResult,
    draws_for_family,
    holm,
    sign_flip_p,
    sign_flip_z,
    z_score,
)
from tlpersona.cache.source import ActivationSource
from tlpersona.chat.positions import RECIPES, canonical
from tlpersona.errors import TlpersonaError
from tlpersona.infra.renames import old_names, take_old_names
from tlpersona.version import __version__

#: position -> recipe letter; the seed's response span is its recipe B too
_ALIAS = {**{v: k for k, v in RECIPES.items()}, "response_mean_seed": "b"}
LOAD_BEARING = {frozenset(p) for p in [("a", "b"), ("a", "bstar"), ("a", "c1"), ("b", "bstar"),
                                       ("bstar", "c1")]}
SANITY = {frozenset(p) for p in [("a", "c2"), ("a", "c3"), ("c2", "c3")]}


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


#: Share of a recipe's persona variance along the first-token direction above which the report
#: warns that the recipe mostly measures the attention sink (and so prompt length).
SINK_WARN = 0.5

#: Why a cell's mean-centred r, and so its Mantel test, has no value.
UNDEFINED_R = "the mean-centred r is undefined: a recipe's persona geometry is constant"

#: Positions compared by default besides the seven recipes, when the input has them.
EXTRA_DEFAULT = ("prompt_mean_no_first", "response_mean_seed")


def verdict(min_cos: float, mc_r: float | None, spread_rho: float | None, th: Thresholds,
            mantel_p: float | None = None, alpha: float = 0.05) -> str:
    """PASS / GREY / KILL (see :class:`Thresholds`). ``mc_r`` None: undefined, a recipe's
    persona geometry being constant (every persona alike), which never passes. ``mantel_p``:
    the mean-centred matrix r's Mantel p (None: not gated). With few personas unrelated recipes
    clear the bounds by chance (sharing one persona direction: 17 % of cells at 4 personas,
    4 % at 6), so agreement is only called where the geometry is also more alike than shuffled
    personas'."""
    if min_cos < th.kill_min_cos or (mc_r is not None and mc_r < th.kill_mc_r):
        return "KILL"
    if mc_r is None:
        return "GREY"
    spread_ok = not th.gate_spread or spread_rho is None or spread_rho > th.pass_spread
    beyond_null = mantel_p is None or mantel_p < alpha
    if min_cos > th.pass_min_cos and mc_r > th.pass_mc_r and spread_ok and beyond_null:
        return "PASS"
    return "GREY"


def _ceil(ceiling: Ceiling | Mapping[str, float | None], key: str) -> float | None:
    value: float | None = (getattr(ceiling, key) if isinstance(ceiling, Ceiling)
                           else ceiling.get(key))
    return value


def within_noise(min_cos: float, mc_r: float | None, spread_rho: float | None,
                 ceiling: Ceiling | Mapping[str, float | None], th: Thresholds,
                 mantel_p: float | None = None, alpha: float = 0.05) -> bool:
    """Whether every bound a cell that does not pass misses (the PASS bounds, and the KILL
    bounds for a KILL) is missed by its split-half ceiling (``ceiling``, from
    :func:`tlpersona.analyses.ceilings.ceiling`) too: identical recipes' expected value would
    get the same verdict. Descriptive: it compares point values, so it is not the "(noise)"
    mark, which tests the observed value against its ceiling with its sampling error
    (:func:`noise_check`). False for PASS, where a missed bound has no ceiling (the spread),
    where the Mantel condition fails, and where ``mc_r`` is undefined (None), which has no
    value to hold against its ceiling."""
    if mc_r is None or verdict(min_cos, mc_r, spread_rho, th, mantel_p, alpha) == "PASS":
        return False
    if mantel_p is not None and mantel_p >= alpha:
        return False

    def misses(v: float, bound: float, kill: bool) -> bool:
        return v < bound if kill else v <= bound

    c_cos, c_r = _ceil(ceiling, "per_persona_cos_min"), _ceil(ceiling, "matrix_mc_pearson")
    bounds: list[tuple[float, float | None, float, bool]] = [
        (min_cos, c_cos, th.pass_min_cos, False), (mc_r, c_r, th.pass_mc_r, False),
        (min_cos, c_cos, th.kill_min_cos, True), (mc_r, c_r, th.kill_mc_r, True)]
    if th.gate_spread and spread_rho is not None:
        bounds.append((spread_rho, None, th.pass_spread, False))
    missed = [(c, b, k) for x, c, b, k in bounds if misses(x, b, k)]
    return bool(missed) and all(c is not None and misses(c, b, k) for c, b, k in missed)


def half_sd(hx: Halves, hy: Halves) -> dict[str, float]:
    """Sampling standard deviation, over questions, of a pair's per-persona min cos and
    mean-centred r: the delete-half jackknife of :func:`tlpersona.analyses.ceilings.mc_r_sd`
    (which gives the r's, and says why), the min cos recomputed the same way on every half of
    the questions, both recipes on the same half. Unlike the r, the per-persona cosine compares
    the two recipes' vectors coordinate by coordinate, so both must have one width. Zero where
    both recipes are question-invariant."""
    per_persona = np.einsum("phd,phd->ph", hx.unit.astype(np.float32), hy.unit.astype(np.float32))
    mins = per_persona.min(0).astype(np.float64)
    return {"min_cos": float(mins.std()), "mc_r": mc_r_sd(hx, hy)}


def noise_check(min_cos: float, mc_r: float | None, spread_rho: float | None,
                ceiling: Ceiling | Mapping[str, float | None], sd: dict[str, float] | None,
                th: Thresholds, mantel_p: float | None = None,
                alpha: float = 0.05) -> NoiseCheck | None:
    """The "(noise)" mark of a cell (:class:`NoiseCheck`); None for PASS. The statistics tested
    are those whose bound the verdict rests on (:func:`failed_bounds`: the KILL bounds of a
    KILL, the PASS bounds of a GREY), each one-sided against its full-size ceiling at
    ``alpha`` / (statistics tested), so that identical recipes get "beyond noise" at most
    ``alpha`` of the time. The ceilings run low under heavy noise (Spearman–Brown on a
    half-size minimum, and on a noisy r), which only makes "beyond noise" rarer. An undefined
    ``mc_r`` (None: a constant persona geometry) misses the PASS bound with no value to test:
    such a GREY is "inconclusive" unless the min cos is beyond noise."""
    v = verdict(min_cos, mc_r, spread_rho, th, mantel_p, alpha)
    if v == "PASS":
        return None
    kill = v == "KILL"
    missed = [(name, obs, key) for name, obs, key, bound in [
        ("min cos", min_cos, "per_persona_cos_min", th.kill_min_cos if kill else th.pass_min_cos),
        ("mc r", mc_r, "matrix_mc_pearson", th.kill_mc_r if kill else th.pass_mc_r)]
        if obs is not None and (obs < bound if kill else obs <= bound)]
    undefined = mc_r is None and not kill
    spread_missed = (not kill and th.gate_spread and spread_rho is not None
                     and spread_rho <= th.pass_spread)
    if not missed:  # GREY on the Mantel gate or the spread alone: neither has a ceiling
        return NoiseCheck("inconclusive", UNDEFINED_R if undefined else
                          "only bounds without a ceiling are missed (the Mantel gate or the "
                          "spread)", [])
    level = alpha / len(missed)
    crit = float(stats.norm.isf(level))
    tests = [_noise_test(name, obs, _ceil(ceiling, key),
                         None if sd is None else sd["min_cos" if name == "min cos" else "mc_r"],
                         level, crit) for name, obs, key in missed]
    if any(t.below for t in tests):
        return NoiseCheck("beyond noise", "below its ceiling by more than its sampling error",
                          tests)
    if undefined:
        return NoiseCheck("inconclusive", UNDEFINED_R, tests)
    if spread_missed or any(t.z is None for t in tests):
        return NoiseCheck("inconclusive", "a missed bound has no ceiling or sampling error",
                          tests)
    return NoiseCheck("noise", "within sampling error of what identical recipes reach", tests)


def _noise_test(name: str, obs: float, ceil: float | None, sd: float | None, level: float,
                crit: float) -> NoiseTest:
    if ceil is None or sd is None:
        return NoiseTest(name, obs, ceil, sd, None, level, False)
    gap = obs - ceil
    if sd == 0:  # no sampling noise: any shortfall is a difference
        return NoiseTest(name, obs, ceil, sd, -math.inf if gap < -1e-9 else 0.0, level, gap < -1e-9)
    z = gap / sd
    return NoiseTest(name, obs, ceil, sd, z, level, z < -crit)


def failed_bounds(min_cos: float, mc_r: float | None, spread_rho: float | None, th: Thresholds,
                  mantel_p: float | None = None, alpha: float = 0.05) -> list[str]:
    """The conditions a cell misses, KILL bounds first (``min cos < 0.85``), then the PASS ones
    it misses: what a verdict rests on, so a KILL from raw cosines (common offsets) reads apart
    from one from the persona geometry. An undefined ``mc_r`` (None) misses the PASS bound as
    ``mc r undefined``."""
    out = [f"min cos < {th.kill_min_cos:g}"] if min_cos < th.kill_min_cos else []
    if mc_r is not None and mc_r < th.kill_mc_r:
        out.append(f"mc r < {th.kill_mc_r:g}")
    if out:
        return out
    if min_cos <= th.pass_min_cos:
        out.append(f"min cos ≤ {th.pass_min_cos:g}")
    if mc_r is None:
        out.append("mc r undefined (constant geometry)")
    elif mc_r <= th.pass_mc_r:
        out.append(f"mc r ≤ {th.pass_mc_r:g}")
    if th.gate_spread and spread_rho is not None and spread_rho <= th.pass_spread:
        out.append(f"spread ρ ≤ {th.pass_spread:g}")
    if mantel_p is not None and mantel_p >= alpha:
        out.append(f"Mantel p ≥ {alpha:g}")
    return out


def default_positions(available: list[str]) -> list[str]:
    """The seven recipes, the sink-free prompt mean and the seed's response span, that
    ``available`` holds."""
    return [p for p in [*RECIPES.values(), *EXTRA_DEFAULT] if p in available]


def pair_tag(x: str, y: str) -> str:
    key = frozenset((_ALIAS.get(x, x), _ALIAS.get(y, y)))
    return "load-bearing" if key in LOAD_BEARING else "sanity" if key in SANITY else "other"


def recipe_label(pos: str) -> str:
    """``last`` -> ``A (last)``: recipe letters as the seed wrote them."""
    alias = _ALIAS.get(pos)
    if alias is None:
        return pos
    letter = {"bstar": "B*", "bstar_no_last": "B*_no_last"}.get(alias, alias.upper())
    return f"{letter} ({pos})"


def cliques(nodes: list[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    """Maximal groups whose every pair is an edge (groups may overlap; isolated nodes are
    groups of one). Largest first, then in ``nodes`` order. Exhaustive over subsets: a
    comparison has a handful of recipes."""
    adj = {frozenset(e) for e in edges}
    found: list[frozenset[str]] = []
    for size in range(len(nodes), 0, -1):
        for group in itertools.combinations(nodes, size):
            g = frozenset(group)
            if any(g <= f for f in found):
                continue
            if all(frozenset(p) in adj for p in itertools.combinations(group, 2)):
                found.append(g)
    return [[n for n in nodes if n in g] for g in found]


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
    pair_cells = _adjusted(cells, th, cfg.alpha, procrustes_corrected)
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


@dataclass
class PerQuestion:
    """What the per-question pass gives every compared recipe: per recipe and layer, the spread
    per question ``[question]`` and the noise floor (or why it has none); per (recipe, layer),
    the floor's halves (absent: noise unknown) and the split-half CKA."""

    spreads: dict[str, dict[int, np.ndarray]]
    floors: dict[str, dict[int, FloorStats | FloorReason]]
    halves: dict[tuple[str, int], Halves]
    cka: dict[tuple[str, int], M.SplitHalfCka]


def per_question_pass(source: ActivationSource, positions: list[str], layers: list[int],
                      n_splits: int, seed: int, iu: tuple[np.ndarray, np.ndarray],
                      clock: StageClock) -> PerQuestion:
    """:func:`question_pass` over every recipe of ``positions`` that has per-question vectors,
    in ``positions`` order; a question-invariant recipe, or one without per-question vectors,
    gets only the reason it has no noise floor."""
    out = PerQuestion({}, {}, {}, {})
    for p in positions:
        clock.start()
        if source.question_invariant(p) or not source.has_per_question(p):
            reason = (FloorReason(True, "question-invariant: no sampling noise")
                      if source.question_invariant(p) else
                      FloorReason(None, "no per-question vectors in the input"))
            out.floors[p] = {layer: reason for layer in layers}
            continue
        qp = question_pass(source, p, layers, n_splits, seed, iu)
        out.spreads[p], out.floors[p] = qp.spreads, qp.floors
        out.halves.update({(p, layer): h for layer, h in qp.halves.items()})
        out.cka.update({(p, layer): h for layer, h in qp.cka.items()})
        clock.tick("spread and noise floor")
    return out


@dataclass(frozen=True)
class LayerCentroids:
    """One layer's persona centroids per recipe ``[persona, d]`` (float64), mean-centred, and
    their (raw, mean-centred) cosine matrices ``[persona, persona]``."""

    cent: dict[str, np.ndarray]
    mc: dict[str, np.ndarray]
    mats: dict[str, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def of(cls, source: ActivationSource, layer: int, positions: list[str]) -> LayerCentroids:
        li = source.layer_index(layer)
        cent = {p: source.centroids(p)[:, li].double().numpy() for p in positions}
        mc = {p: M.mean_centre(c) for p, c in cent.items()}
        mats = {p: (M.cos_matrix(cent[p]), M.cos_matrix(mc[p])) for p in positions}
        return cls(cent, mc, mats)


@dataclass(frozen=True)
class LayerTests:
    """One layer's permutation-tested statistics: Mantel per (x, y, 0 raw | 1 mean-centred)
    (None: a constant geometry), held-out Procrustes and CKA per pair, CKA reliability per
    recipe."""

    mantel: dict[tuple[str, str, int], MantelResult | None]
    procrustes: dict[tuple[str, str], M.ProcrustesScore]
    cka: dict[tuple[str, str], M.CkaScore]
    reliability: dict[str, CkaReliability]


@dataclass(frozen=True)
class LayerCells:
    """What :func:`layer_cells` gives for one layer: its cells in pair order, the mean-centred
    cosine matrices per recipe ``[persona, persona]`` (for the report's figure), and the
    per-persona cosines per pair ``[persona]`` (for :func:`paired_tests`)."""

    cells: list[UnadjustedCell]
    cos_matrices: dict[str, np.ndarray]
    per_persona_cos: dict[tuple[str, str], np.ndarray]


def layer_cells(source: ActivationSource, layer: int, positions: list[str],
                permuter: MantelPermuter, per_q: PerQuestion, cfg: CompareConfig,
                clock: StageClock) -> LayerCells:
    """Every pair of ``positions`` (``itertools.combinations`` order) at ``layer``, before Holm.
    The held-out Procrustes null draws from ``cfg.seed + layer``; the Mantel and CKA nulls use
    ``permuter``'s draws, the same at every layer."""
    pairs = list(itertools.combinations(positions, 2))
    lc = LayerCentroids.of(source, layer, positions)
    halves = {p: per_q.halves.get((p, layer)) for p in positions}
    for p in positions:
        if source.question_invariant(p):  # no noise: every half is the centroid
            halves[p] = Halves.of(lc.cent[p][:, None], permuter.iu)
    clock.tick("centroid metrics")
    mantel = mantel_tests(permuter, pairs, positions, lc.mats)
    clock.tick("mantel permutations")
    held = M.HeldOutProcrustes(len(source.personas), M.PROCRUSTES_SPLITS,
                               np.random.default_rng(cfg.seed + layer), cfg.null_draws)
    for p in positions:
        held.add(p, lc.cent[p])
    proc = held.score_pairs(pairs)
    clock.tick("held-out Procrustes and its null")
    grams = {p: M.centred_gram(lc.cent[p]) for p in positions}
    cka = cka_tests(permuter, pairs, positions, grams)
    reliability = {p: cka_reliability(per_q.cka.get((p, layer)), grams[p],
                                      source.question_invariant(p)) for p in positions}
    tests = LayerTests(mantel, proc, cka, reliability)
    clock.tick("CKA and its null")
    spreads = {p: per_q.spreads[p].get(layer) if p in per_q.spreads else None
               for p in positions}
    cells, pp_cos = [], {}
    for x, y in pairs:
        cell = pair_cell(source, layer, (x, y), lc, tests, spreads, halves,
                         per_q.floors, permuter, cfg)
        cells.append(cell)
        pp_cos[(x, y)] = cell.cos
    clock.tick("pair metrics")
    return LayerCells(cells, {p: lc.mats[p][1] for p in positions}, pp_cos)


def mantel_tests(permuter: MantelPermuter, pairs: list[tuple[str, str]], positions: list[str],
                 mats: dict[str, tuple[np.ndarray, np.ndarray]]
                 ) -> dict[tuple[str, str, int], MantelResult | None]:
    """The raw (kind 0) and mean-centred (kind 1) Mantel test of every pair (x, y). Grouped by
    the permuted matrix: one recipe's permutations in memory at a time, and one matrix product
    per recipe for all its partners."""
    mantel: dict[tuple[str, str, int], MantelResult | None] = {}
    for y in positions:
        xs = [x for x, yy in pairs if yy == y]
        for kind in (0, 1):  # raw, mean-centred
            if xs:
                res = permuter.tests([mats[x][kind] for x in xs], mats[y][kind])
                mantel.update({(x, y, kind): r for x, r in zip(xs, res, strict=True)})
    return mantel


def cka_tests(permuter: MantelPermuter, pairs: list[tuple[str, str]], positions: list[str],
              grams: dict[str, np.ndarray]) -> dict[tuple[str, str], M.CkaScore]:
    """Linear and debiased CKA of every pair (x, y) from the recipes' centred Gram matrices
    ``[persona, persona]``, against one gathered null per y for all its partners (the Mantel
    draws)."""
    cka: dict[tuple[str, str], M.CkaScore] = {}
    for y in positions:
        xs = [x for x, yy in pairs if yy == y]
        if xs:
            scores = M.cka_scores([grams[x] for x in xs], grams[y], permuter.perms,
                                  permuter.flat)
            cka.update({(x, y): s for x, s in zip(xs, scores, strict=True)})
    return cka


def pair_cell(source: ActivationSource, layer: int, pair: tuple[str, str], lc: LayerCentroids,
              tests: LayerTests, spreads: dict[str, np.ndarray | None],
              halves: dict[str, Halves | None],
              floors: dict[str, dict[int, FloorStats | FloorReason]],
              permuter: MantelPermuter, cfg: CompareConfig) -> UnadjustedCell:
    """One cell: the pair's per-persona cosines and their shuffled-label baselines, its
    matrix tests, spread, ceiling and "(noise)" check, before Holm."""
    x, y = pair
    th = cfg.thresholds
    cent, mc, mats = lc.cent, lc.mc, lc.mats
    cos = M.rowwise_cos(cent[x], cent[y])
    mc_cos = M.rowwise_cos(mc[x], mc[y])
    raw_t = (M.upper(mats[x][0]), M.upper(mats[y][0]))
    mc_t = (M.upper(mats[x][1]), M.upper(mats[y][1]))
    spread, rho = spread_of(source, pair, spreads[x], spreads[y], th)
    s = M.Summary.of(cos)
    pair_ceiling = ceiling(floors[x].get(layer), floors[y].get(layer))
    # geo: the mean-centred test
    raw_test, geo = tests.mantel[(x, y, 0)], tests.mantel[(x, y, 1)]
    hx, hy = halves[x], halves[y]
    noise = noise_check(s.min, None if geo is None else geo.r, rho, pair_ceiling,
                        None if hx is None or hy is None else half_sd(hx, hy), th,
                        None if geo is None else geo.p, cfg.alpha)
    mcs = M.Summary.of(mc_cos)
    return UnadjustedCell(
        layer=layer, pair=(x, y),
        per_persona_cos=CosStats(s.mean, s.min, s.p5, s.max,
                                 _shuffled_cos_mean(cent[x], cent[y]),
                                 *_shuffled_cos_low(cent[x], cent[y], permuter.perms)),
        per_persona_cos_mc=CentredCosStats(mcs.mean, mcs.min, mcs.p5, mcs.max,
                                           _shuffled_cos_mean(mc[x], mc[y])),
        procrustes=tests.procrustes[(x, y)].held_out(pair_ceiling.procrustes_cos_mean),
        matrix_raw=(raw_test, _spearman(raw_test, raw_t)),
        matrix_mc=(geo, _spearman(geo, mc_t)),
        spread=spread, ceiling=pair_ceiling, rho=rho, noise=noise,
        per_persona_cos_all=[round(float(v), 6) for v in cos],
        cka=cka_cell(tests.cka[(x, y)], tests.reliability[x], tests.reliability[y],
                     permuter.n_perm),
        cos=cos)


def spread_of(source: ActivationSource, pair: tuple[str, str], sx: np.ndarray | None,
              sy: np.ndarray | None, th: Thresholds) -> tuple[Spread | SpreadSkipped, float | None]:
    """The Spearman ρ between two recipes' spreads per question ``[question]`` (questions
    where either is NaN left out), or why there is none; and ρ itself (None where skipped)."""
    if sx is None or sy is None:
        x, y = pair
        why = ("question-invariant recipe: no per-question variation"
               if source.question_invariant(x) or source.question_invariant(y)
               else "no per-question vectors in the input")
        return SpreadSkipped(reason=why), None
    ok = ~(np.isnan(sx) | np.isnan(sy))
    sp = stats.spearmanr(sx[ok], sy[ok])
    rho = float(sp[0])
    return Spread(rho, float(sp[1]), int(ok.sum()), th.gate_spread), rho


#: One paired test before Holm: (layer, pair 1, pair 2, mean difference, sign-flip p, z).
PairedRow = tuple[int, tuple[str, str], tuple[str, str], float, float, float]


def paired_tests(layer: int, per_persona_cos: dict[tuple[str, str], np.ndarray]
                 ) -> list[PairedRow]:
    """For two pairs sharing a recipe, is one more aligned than the other? The sign-flip test
    of their per-persona cosine differences ``[persona]``, for every such two of
    ``per_persona_cos``'s pairs (in ``itertools.combinations`` order), before Holm."""
    pairs = list(per_persona_cos)
    tests = [(a, b) for a, b in itertools.combinations(pairs, 2) if set(a) & set(b)]
    if not tests:
        return []
    d = np.stack([per_persona_cos[a] - per_persona_cos[b] for a, b in tests])
    pvals = sign_flip_p(d)
    zs = sign_flip_z(d)
    return [(layer, a, b, float(dv.mean()), float(pv), float(z))
            for (a, b), dv, pv, z in zip(tests, d, pvals, zs, strict=True)]


def paired_holm(rows: list[PairedRow]) -> list[PairedTest]:
    """The paired tests of every layer with Holm over all of them (one family)."""
    adjusted = [float(a) for a in holm([t[4] for t in rows])]
    return [PairedTest(layer, a, b, diff, p, z, q)
            for (layer, a, b, diff, p, z), q in zip(rows, adjusted, strict=True)]


@dataclass(frozen=True)
class UnadjustedCell:
    """One cell's statistics before Holm over every cell of the run adjusts its p-values
    (:func:`_adjusted` makes the :class:`PairCell`)."""

    layer: int
    pair: tuple[str, str]
    per_persona_cos: CosStats
    per_persona_cos_mc: CentredCosStats
    procrustes: HeldOutCos | HeldOutSkipped
    # the test and the triangles' Spearman r; None: a constant geometry, where both are undefined
    matrix_raw: tuple[MantelResult | None, float | None]
    matrix_mc: tuple[MantelResult | None, float | None]
    spread: Spread | SpreadSkipped
    ceiling: Ceiling
    rho: float | None  # the spread's Spearman ρ
    noise: NoiseCheck | None
    per_persona_cos_all: list[float]
    cka: CkaCell
    cos: np.ndarray  # per-persona cosines [persona], unrounded: the paired tests' input


def _holm_of(ps: list[float | None]) -> list[float | None]:
    """Holm over the p-values of ``ps`` (one family); None where a p is None."""
    adj = holm([np.nan if p is None else p for p in ps])
    return [None if p is None else float(a) for p, a in zip(ps, adj, strict=True)]


def _adjusted(cells: list[UnadjustedCell], th: Thresholds, alpha: float,
              procrustes_corrected: bool) -> list[PairCell]:
    """The cells with their p-values Holm-adjusted, one family per kind of test across every
    cell of the run; the held-out Procrustes p only where its draws can reach ``alpha``."""
    raw = _holm_of([None if c.matrix_raw[0] is None else c.matrix_raw[0].p for c in cells])
    geo = _holm_of([None if c.matrix_mc[0] is None else c.matrix_mc[0].p for c in cells])
    proc = (_holm_of([c.procrustes.p if isinstance(c.procrustes, HeldOutCos) else None
                      for c in cells]) if procrustes_corrected else [None] * len(cells))
    lin = _holm_of([c.cka.linear.p for c in cells])
    deb = _holm_of([c.cka.debiased.p for c in cells])
    out = []
    for c, raw_h, geo_h, proc_h, lin_h, deb_h in zip(cells, raw, geo, proc, lin, deb,
                                                      strict=True):
        (x, y), s, g = c.pair, c.per_persona_cos, c.matrix_mc[0]
        r, p = (None, None) if g is None else (g.r, g.p)
        out.append(PairCell(
            layer=c.layer, pair=c.pair, tag=pair_tag(x, y),
            per_persona_cos=s, per_persona_cos_mc=c.per_persona_cos_mc,
            procrustes=(replace(c.procrustes, p_holm=proc_h)
                        if isinstance(c.procrustes, HeldOutCos) else c.procrustes),
            matrix_raw=_matrix(c.matrix_raw[0], c.matrix_raw[1], raw_h),
            matrix_mc=_matrix(c.matrix_mc[0], c.matrix_mc[1], geo_h),
            mantel_p=p, spread=c.spread, ceiling=c.ceiling,
            verdict=verdict(s.min, r, c.rho, th, p, alpha),
            failed_bounds=failed_bounds(s.min, r, c.rho, th, p, alpha),
            within_noise=within_noise(s.min, r, c.rho, c.ceiling, th, p, alpha),
            noise_mark=None if c.noise is None else c.noise.mark, noise_test=c.noise,
            per_persona_cos_all=c.per_persona_cos_all,
            cka=replace(c.cka, linear=replace(c.cka.linear, p_holm=lin_h),
                        debiased=replace(c.cka.debiased, p_holm=deb_h))))
    return out


@dataclass
class QuestionPass:
    """What one pass over a recipe's per-question vectors gives, per layer."""

    spreads: dict[int, np.ndarray]  # spread per question
    floors: dict[int, FloorStats | FloorReason]  # split-half noise floor (controls.floor_stats)
    halves: dict[int, Halves]  # the floor's halves, for the sampling error of pair statistics
    cka: dict[int, M.SplitHalfCka]  # split-half CKA, for the CKA ceilings


def question_pass(source: ActivationSource, pos: str, layers: list[int], n_splits: int,
                  seed: int, iu: tuple[np.ndarray, np.ndarray]) -> QuestionPass:
    """Spread per question, the noise floor and its halves for every layer, in one pass over a
    recipe's per-question vectors, ``CHUNK`` personas at a time (full scale is ~2 GB per
    recipe). The question splits depend on ``seed`` only, so every recipe gets the same."""
    valid = source.valid(pos)
    n_p, n_q = valid.shape
    lis = [source.layer_index(layer) for layer in layers]
    masks = split_masks(n_q, n_splits, seed) if n_q >= 2 else None
    sums = [torch.zeros((n_q, 1), dtype=torch.float64) for _ in layers]
    parts: list[list[torch.Tensor]] = [[] for _ in layers]
    for start in range(0, n_p, CHUNK):
        block = source.per_question_rows(pos, start, min(start + CHUNK, n_p))  # [c, q, L, d]
        ok = valid[start:start + block.shape[0]]
        for j, li in enumerate(lis):
            v = block[:, :, li].float()
            sums[j] = sums[j] + M.spread_sums(v, ok)
            if masks is not None:
                parts[j].append(half_centroids(v, ok, masks))
    out = QuestionPass({}, {}, {}, {})
    for j, layer in enumerate(layers):
        out.spreads[layer] = M.spread_finish(sums[j], valid.sum(0))
        if masks is None:
            out.floors[layer] = FloorReason(None, "fewer than 2 questions")
            continue
        h = torch.cat(parts[j]).double().numpy()
        out.floors[layer] = floor_stats(h, iu, seed + layer)
        out.halves[layer] = Halves.of(h, iu)
        out.cka[layer] = M.split_half_cka(h)
    return out


def _shuffled_cos_mean(x: np.ndarray, y: np.ndarray) -> float:
    """Expected mean per-persona cosine when one recipe's persona labels are shuffled uniformly
    at random: the mean of every (i, j) cosine (exact, no sampling)."""
    return float(np.mean(M.unit(x) @ M.unit(y).T))


def _shuffled_cos_low(x: np.ndarray, y: np.ndarray, perms: np.ndarray
                      ) -> tuple[float, float, float, float]:
    """The minimum and 5th percentile of the per-persona cosines with one recipe's persona labels
    shuffled by each of ``perms`` ``[N, n]`` (the Mantel test's permutations): their means and
    95th percentiles. A shared offset keeps raw cosines near 1 for any pairing; this says how
    high the low end is then. Returns (minimum's mean, its p95, 5th percentile's mean, its
    p95)."""
    c = M.unit(x) @ M.unit(y).T
    shuffled = c[np.arange(len(x))[None, :], perms]  # [N, n]
    mins, p5s = shuffled.min(1), np.percentile(shuffled, 5, axis=1)
    return (float(mins.mean()), float(np.percentile(mins, 95)), float(p5s.mean()),
            float(np.percentile(p5s, 95)))


def _spearman(test: MantelResult | None, tris: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Spearman r of two upper triangles ``[pairs]``; None where their Mantel ``test`` is
    undefined (a constant triangle, on which scipy warns and returns NaN)."""
    return None if test is None else float(stats.spearmanr(*tris)[0])


def _matrix(res: MantelResult | None, spearman: float | None,
            p_holm: float | None) -> MatrixStats:
    if res is None:
        return MatrixStats(None, None, None, None, None, None, None, None)
    return MatrixStats(res.r, spearman, res.p, res.null_mean, res.null_sd, res.null_p95,
                       z_score(res.r, res.null_mean, res.null_sd), p_holm)


def sink_diagnostic(source: ActivationSource, positions: list[str], layers: list[int]
                    ) -> SinkCheck:
    """Per layer and recipe, the share of the recipe's persona variance (mean-centred centroids)
    that lies along the first token's residual direction, the attention sink. Where it is large
    the recipe's differences between personas are mostly the sink's weight in a mean, i.e.
    prompt length: the correlation with mean 1/prompt length is reported where known."""
    if "first" not in source.positions:
        return SinkCheck(False, reason="the input has no `first` position (extract it to "
                                       "measure the sink)")
    rows: dict[int, SinkLayer] = {}
    for layer in layers:
        li = source.layer_index(layer)
        sink = source.centroids("first")[:, li].double().numpy().mean(0)
        u = sink / max(np.linalg.norm(sink), 1e-30)
        entries: dict[str, RecipeSinkLength | RecipeSink] = {}
        for p in positions:
            xc = M.mean_centre(source.centroids(p)[:, li].double().numpy())
            total = float(np.sum(xc * xc))
            along = xc @ u
            share = float(np.sum(along**2) / total) if total > 0 else None
            warning = share is not None and share > SINK_WARN
            n_tok = source.n_tokens(p)
            if n_tok is not None and total > 0:
                inv = (1.0 / n_tok.double().clamp(min=1)).mean(1).numpy()
                r = (float(np.corrcoef(along, inv)[0, 1])
                     if np.std(inv) > 0 and np.std(along) > 0 else None)
                entries[p] = RecipeSinkLength(share, r, warning)
            else:
                entries[p] = RecipeSink(share, warning)
        rows[layer] = SinkLayer(float(np.linalg.norm(sink)), entries)
    return SinkCheck(True, warn_above=SINK_WARN, layers=rows)


def missing_rows(source: ActivationSource, positions: list[str]) -> dict[str, dict[str, int]]:
    """Per position, the personas with missing per-question rows (e.g. empty responses) and how
    many; those rows are left out of that position's centroids and statistics."""
    out = {}
    for p in positions:
        if source.question_invariant(p):
            continue
        counts = (~source.valid(p)).sum(1)
        bad = {source.personas[i]: int(c) for i, c in enumerate(counts) if c > 0}
        if bad:
            out[p] = bad
    return out


def mantel_floor(n_personas: int, n_perm: int) -> float:
    """The smallest Mantel p a cell can get: 1 / (N + 1), and with n personas only n!
    relabellings exist. Compared as integers: n! overflows a float from 171 personas on."""
    relabellings = math.factorial(n_personas)
    return 1.0 / (n_perm + 1) if relabellings >= n_perm + 1 else 1.0 / relabellings


def overall(cells: list[PairCell], positions: list[str], layers: list[int], th: Thresholds,
            alpha: float, n_personas: int, n_permutations: int, n_null: int,
            procrustes_corrected: bool) -> Overall:
    """Recipe-robust or not, which recipes agree (groups whose every pair passes) per layer and
    at every layer, what the nulls support, and the one-sentence answer of the report's first
    screen."""
    per_layer = {}
    for layer in layers:
        edges = [c.pair for c in cells if c.layer == layer and c.verdict == "PASS"]
        per_layer[layer] = cliques(positions, edges)
    always = [c.pair for c in cells
              if all(d.verdict == "PASS" for d in cells if d.pair == c.pair)]
    lb = [c for c in cells if c.tag == "load-bearing"]
    # counted as recipe pairs: both response spans are recipe B, so A~B compared twice is one pair
    n_lb = len({frozenset(_ALIAS.get(p, p) for p in c.pair) for c in lb})
    all_pass = bool(lb) and all(c.verdict == "PASS" for c in lb)
    robust = all_pass and n_lb == len(LOAD_BEARING)
    kills = kill_text(lb)
    groups_all = cliques(positions, always)
    groups = " | ".join("{" + ", ".join(g) + "}" for g in groups_all)
    notes: list[str] = []
    if not lb:
        sentence = "No load-bearing pair was compared, so recipe robustness is not assessed."
    elif robust:
        sentence = "Recipe-robust: every load-bearing pair passes at every layer."
    elif all_pass:
        sentence = (f"Only {n_lb} of {len(LOAD_BEARING)} load-bearing pairs were compared; they "
                    "pass at every layer, which does not establish recipe robustness.")
    else:
        sentence = (f"Not recipe-robust: {sum(c.verdict != 'PASS' for c in lb)} of {len(lb)} "
                    "load-bearing cells fail to pass"
                    + (f" (KILL: {kills})" if kills else "") + ".")
        notes += noise_notes(lb, alpha)
        offsets = [c for c in lb if c.verdict == "KILL" and c.failed_bounds == [
            f"min cos < {th.kill_min_cos:g}"]]
        if offsets:
            notes.append(f"{len(offsets)} load-bearing KILL(s) rest on the raw per-persona "
                         "minimum cosine alone, which common offsets drive; read the "
                         "mean-centred r against its ceiling there (details).")
    sentence += f" Recipes that agree at every layer (every pair passes): {groups}."
    notes.append(f"A PASS needs the mean-centred geometry beyond its Mantel null (p < {alpha:g}), "
                 f"which unrelated recipes clear in at most {alpha:g} of cells (per cell, "
                 "uncorrected over cells; the Mantel test is exact).")
    floor = mantel_floor(n_personas, n_permutations)
    if floor >= alpha:
        notes.append(f"No cell can pass here: PASS needs the mean-centred geometry beyond its "
                     f"Mantel null (p < {alpha:g}), and with {n_personas} personas p "
                     f"cannot fall below {floor:.3f}.")
    mantel = _beyond_null([c.matrix_mc.mantel_p for c in cells],
                          [c.matrix_mc.mantel_p_holm for c in cells], floor, alpha)
    sentence += (f" {mantel[0]} of {mantel[1]} cells have mean-centred persona geometries more "
                 f"alike than shuffled personas give (Mantel, {n_permutations} "
                 f"permutations, Holm over all cells at {alpha:g}).")
    if mantel[2]:
        notes.append(mantel[2])
    constant = [c for c in cells if c.matrix_mc.mantel_p is None]
    if constant:
        notes.append(f"{len(constant)} cell(s) compare a recipe whose persona geometry is "
                     "constant (every persona's centroid alike): their mean-centred r and "
                     "Mantel p are undefined, so they cannot pass and are left out of Holm ("
                     + ", ".join(f"L{c.layer} {'~'.join(c.pair)}" for c in constant) + ").")
    proc = [c.procrustes for c in cells if isinstance(c.procrustes, HeldOutCos)]
    if proc and procrustes_corrected:
        k = sum((1.0 if pc.p_holm is None else pc.p_holm) < alpha for pc in proc)
        notes.append(f"{k} of {len(proc)} cells align personas under a held-out rotation better "
                     "than relabelled personas do (Procrustes, Holm over all cells).")
    elif proc:
        notes.append(f"The held-out Procrustes cosine is an effect size beside its ceiling and its "
                     f"{n_null}-draw null (z, p95), not a corrected test: Holm over {len(proc)} "
                     f"cells would need at least {math.ceil(len(proc) / alpha)} draws "
                     "(`null_draws`).")
    if n_personas < 8:
        notes.append(f"With {n_personas} personas the nulls are wide; read agreement "
                     "statistics as descriptive.")
    return Overall(robust, sentence, groups_all, per_layer, answer(lb, layers, mantel[:2], robust),
                   notes)


def kill_text(rows: list[PairCell]) -> str:
    """The KILLed pairs of ``rows`` with the bound each failed and where:
    ``last~response_mean (min cos < 0.85 at L7, L15)``."""
    by_pair: dict[str, dict[str, list[int]]] = {}
    for c in rows:
        if c.verdict == "KILL":
            for bound in c.failed_bounds:
                by_pair.setdefault("~".join(c.pair), {}).setdefault(bound, []).append(c.layer)
    return ", ".join(f"{pair} (" + "; ".join(f"{b} at {', '.join(f'L{x}' for x in ls)}"
                                             for b, ls in bounds.items()) + ")"
                     for pair, bounds in sorted(by_pair.items()))


def noise_notes(rows: list[PairCell], alpha: float) -> list[str]:
    """What the "(noise)" marks of the load-bearing cells ``rows`` say, one line per mark."""
    said = {
        "beyond noise": "fall below what identical recipes reach (their split-half ceiling) by "
                        f"more than sampling error (one-sided at {alpha:g} per cell, split over "
                        "the statistics tested; marked 'beyond noise'): the recipes differ there",
        "noise": "fail within sampling error of what identical recipes reach (marked 'noise'): "
                 "identical recipes sampled this noisily could give them, so they do not show "
                 "that the recipes differ",
        "inconclusive": "cannot be judged either way (marked 'inconclusive': they miss only "
                        "bounds without a ceiling, such as the Mantel gate, or a recipe has no "
                        "per-question vectors): they show neither agreement nor a difference",
    }
    out = []
    for mark, text in said.items():
        k = sum(c.noise_mark == mark for c in rows)
        if k:
            out.append(f"{k} load-bearing cell(s) {text}.")
    return out


def answer(lb: list[PairCell], layers: list[int], mantel: tuple[int, int], robust: bool) -> str:
    """One sentence: do the recipes agree — the load-bearing cells ``lb``' PASS / GREY / KILL
    per layer, the closest and farthest load-bearing pair by mean-centred geometry (r over the
    layers, beside its ceiling), and how many cells' geometry is beyond chance."""
    if not lb:
        return ("Do the recipes agree? Not assessed: no load-bearing pair was compared "
                f"({mantel[0]}/{mantel[1]} cells beyond chance, Mantel).")
    counts = []
    for layer in layers:
        got = [c.verdict for c in lb if c.layer == layer]
        counts.append(f"L{layer} {got.count('PASS')}/{got.count('GREY')}/{got.count('KILL')}")
    by_pair: dict[str, list[PairCell]] = {}
    for c in lb:
        by_pair.setdefault("~".join(c.pair), []).append(c)

    def mean_of(vals: list[float | None]) -> float | None:
        got = [v for v in vals if v is not None]
        return float(np.mean(got)) if got else None

    mc = {k: mean_of([c.matrix_mc.pearson for c in v]) for k, v in by_pair.items()}
    ceil = {k: mean_of([c.ceiling.matrix_mc_pearson for c in v]) for k, v in by_pair.items()}
    known = {k: v for k, v in mc.items() if v is not None}  # an undefined r ranks nowhere
    ranked = sorted(known, key=lambda k: -known[k])
    lead = "yes, recipe-robust" if robust else "not recipe-robust"
    tail = "" if len(ranked) < 2 else (
        f"; closest {ranked[0]} (mc r {known[ranked[0]]:.2f}"
        + (f", ceiling {ceil[ranked[0]]:.2f}" if ceil[ranked[0]] is not None else "")
        + f"), farthest {ranked[-1]} ({known[ranked[-1]]:.2f})")
    return (f"Do the recipes agree? {lead}: load-bearing PASS/GREY/KILL {', '.join(counts)}"
            f"{tail}; geometry beyond chance in {mantel[0]}/{mantel[1]} cells (Mantel, Holm).")


def _beyond_null(ps: list[float | None], holm_ps: list[float | None], floor: float,
                 alpha: float) -> tuple[int, int, str]:
    """How many cells beat their permutation null after Holm over all cells (``ps``, Holm
    ``holm_ps``; None: undefined, outside the family), of how many, and (where the draws
    cannot reach ``alpha`` after Holm) a sentence saying so."""
    m = len(ps)
    family = sum(p is not None for p in ps)
    k = sum(h is not None and h < alpha for h in holm_ps)
    if family * floor < alpha:
        return k, m, ""
    at = sum(p is not None and p <= floor + 1e-12 for p in ps)
    return k, m, (f"{at} of {m} cells sit beyond every null draw (p = {floor:.4f}), but Holm "
                  f"over {family} cells cannot reach p < {alpha:g} from there: raise the draws "
                  f"to at least {math.ceil(family / alpha)}.")
