"""Verdicts and the answer: what a cell's statistics say against the bounds, and what the
run's cells say together.

A cell is PASS, GREY or KILL (:func:`verdict`, against :class:`~.result.Thresholds`), with the
bounds it misses (:func:`failed_bounds`), whether its ceiling misses them too
(:func:`within_noise`) and its "(noise)" mark (:func:`noise_check`). Over the run,
:func:`overall` groups the recipes that agree (:func:`cliques`), says what the nulls support
and writes the one-sentence answer; pairs are load-bearing, sanity or other
(:func:`pair_tag`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
from scipy import stats

from tlpersona.analyses.ceilings import Ceiling
from tlpersona.analyses.compare.result import NoiseCheck, NoiseTest, Overall, PairCell, Thresholds
from tlpersona.analyses.metrics import HeldOutCos
from tlpersona.chat.positions import RECIPES

#: position -> recipe letter; the seed's response span is its recipe B too
_ALIAS = {**{v: k for k, v in RECIPES.items()}, "response_mean_seed": "b"}
LOAD_BEARING = {frozenset(p) for p in [("a", "b"), ("a", "bstar"), ("a", "c1"), ("b", "bstar"),
                                       ("bstar", "c1")]}
SANITY = {frozenset(p) for p in [("a", "c2"), ("a", "c3"), ("c2", "c3")]}


#: Why a cell's mean-centred r, and so its Mantel test, has no value.
UNDEFINED_R = "the mean-centred r is undefined: a recipe's persona geometry is constant"


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


def pair_tag(x: str, y: str) -> str:
    key = frozenset((_ALIAS.get(x, x), _ALIAS.get(y, y)))
    return "load-bearing" if key in LOAD_BEARING else "sanity" if key in SANITY else "other"


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
