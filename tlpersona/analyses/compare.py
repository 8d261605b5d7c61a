"""Six-way recipe comparison: one cell per layer × pair of positions, with verdicts.

Input is any source with the store's read interface (:class:`tlpersona.cache.Store` or the seed
layout's :class:`tlpersona.cache.seed_layout.SeedSource`).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from tlpersona.analyses import metrics as M
from tlpersona.analyses.controls import bstar_check, per_question_pass
from tlpersona.analyses.stats import MantelPermuter, paired_permutation
from tlpersona.errors import TlpersonaError
from tlpersona.positions import RECIPES, canonical

_ALIAS = {v: k for k, v in RECIPES.items()}
LOAD_BEARING = {frozenset(p) for p in [("a", "b"), ("a", "bstar"), ("a", "c1"), ("b", "bstar"),
                                       ("bstar", "c1")]}
SANITY = {frozenset(p) for p in [("a", "c2"), ("a", "c3"), ("c2", "c3")]}


@dataclass
class Thresholds:
    """PASS needs all of the pass_* bounds exceeded; KILL needs either kill_* bound undercut."""

    pass_min_cos: float = 0.95
    pass_mc_r: float = 0.90
    pass_spread: float = 0.80
    kill_min_cos: float = 0.85
    kill_mc_r: float = 0.70


@dataclass
class CompareConfig:
    positions: list[str] | None = None  # default: the recipes present in the source
    layers: list[int] | None = None  # default: every stored layer
    n_perm: int = 1000
    seed: int = 0
    n_splits: int = 10
    thresholds: Thresholds = field(default_factory=Thresholds)


def verdict(min_cos: float, mc_r: float, spread_rho: float | None, th: Thresholds) -> str:
    if min_cos < th.kill_min_cos or mc_r < th.kill_mc_r:
        return "KILL"
    spread_ok = spread_rho is None or spread_rho > th.pass_spread
    if min_cos > th.pass_min_cos and mc_r > th.pass_mc_r and spread_ok:
        return "PASS"
    return "GREY"


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


def _components(nodes: list[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    parent = {n: n for n in nodes}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in edges:
        parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    return sorted(groups.values(), key=lambda g: (-len(g), nodes.index(g[0])))


def compare(source: Any, cfg: CompareConfig | None = None, timings: dict[str, float] | None = None
            ) -> dict[str, Any]:
    """Every metric for every layer × pair; returns a JSON-ready dict (see results.json)."""
    import time

    cfg = cfg or CompareConfig()
    th = cfg.thresholds
    positions = ([canonical(p) for p in cfg.positions] if cfg.positions
                 else [p for p in RECIPES.values() if p in source.positions])
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
    clock = timings if timings is not None else {}

    def tick(stage: str, t0: float) -> float:
        now = time.perf_counter()
        clock[stage] = clock.get(stage, 0.0) + now - t0
        return now

    permuter = MantelPermuter(n, cfg.n_perm, cfg.seed)
    pairs = list(itertools.combinations(positions, 2))
    cells: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    # Per-question work first, one recipe at a time, streamed over personas: its vectors (GBs
    # at full scale) are read once for all layers.
    spread_by_layer: dict[str, dict[int, np.ndarray]] = {}
    floors: dict[str, Any] = {}
    for p in positions:
        t0 = time.perf_counter()
        if source.question_invariant(p) or not source.has_per_question(p):
            reason = ({"exact": True, "reason": "question-invariant: no sampling noise"}
                      if source.question_invariant(p) else
                      {"exact": None, "reason": "no per-question vectors in the input"})
            floors[p] = {str(layer): reason for layer in layers}
            continue
        spread_by_layer[p], floors[p] = per_question_pass(source, p, layers, cfg.n_splits,
                                                          cfg.seed, permuter.iu)
        tick("spread and noise floor", t0)
    for layer in layers:
        t0 = time.perf_counter()
        li = source.layer_index(layer)
        cent = {p: source.centroids(p)[:, li].double().numpy() for p in positions}
        mc = {p: M.mean_centre(c) for p, c in cent.items()}
        mats = {p: (M.cos_matrix(cent[p]), M.cos_matrix(mc[p])) for p in positions}
        t0 = tick("centroid metrics", t0)
        # Mantel tests grouped by the permuted matrix: one recipe's permutations in memory at a
        # time, and one matrix product per recipe for all its partners.
        mantel: dict[tuple[str, str, int], tuple[float, float]] = {}
        for y in positions:
            xs = [x for x, yy in pairs if yy == y]
            for kind in (0, 1):  # raw, mean-centred
                if xs:
                    py = permuter.permuted(mats[y][kind])
                    res = permuter.many([mats[x][kind] for x in xs], mats[y][kind], py)
                    mantel.update({(x, y, kind): r for x, r in zip(xs, res, strict=True)})
                    del py
        t0 = tick("mantel permutations", t0)
        spreads = {p: spread_by_layer[p].get(layer) if p in spread_by_layer else None
                   for p in positions}
        procrustes = M.HeldOutProcrustes(n, np.random.default_rng(cfg.seed + layer))
        pp_cos: dict[tuple[str, str], np.ndarray] = {}
        for x, y in pairs:
            cos = M.rowwise_cos(cent[x], cent[y])
            pp_cos[(x, y)] = cos
            mc_cos = M.rowwise_cos(mc[x], mc[y])
            proc = procrustes.cos(x, mc[x], y, mc[y])
            raw_t = (M.upper(mats[x][0]), M.upper(mats[y][0]))
            mc_t = (M.upper(mats[x][1]), M.upper(mats[y][1]))
            r_raw, p_raw = mantel[(x, y, 0)]
            r_mc, p_mc = mantel[(x, y, 1)]
            if spreads[x] is None or spreads[y] is None:
                why = ("question-invariant recipe: no per-question variation"
                       if source.question_invariant(x) or source.question_invariant(y)
                       else "no per-question vectors in the input")
                spread_cell: dict[str, Any] = {"spearman": None, "reason": why}
                rho = None
            else:
                ok = ~(np.isnan(spreads[x]) | np.isnan(spreads[y]))
                rho = float(stats.spearmanr(spreads[x][ok], spreads[y][ok])[0])
                spread_cell = {"spearman": rho, "n_questions": int(ok.sum())}
            s = M.Summary.of(cos)
            cell = {
                "layer": layer, "pair": [x, y], "tag": pair_tag(x, y),
                "per_persona_cos": asdict(s),
                "per_persona_cos_mc": asdict(M.Summary.of(mc_cos)),
                "procrustes_cos": asdict(M.Summary.of(proc)),
                "matrix_raw": {"pearson": r_raw, "spearman": float(stats.spearmanr(*raw_t)[0]),
                               "mantel_p": p_raw},
                "matrix_mc": {"pearson": r_mc, "spearman": float(stats.spearmanr(*mc_t)[0]),
                              "mantel_p": p_mc},
                "mantel_p": p_mc,
                "spread": spread_cell,
                "verdict": verdict(s.min, r_mc, rho, th),
                "per_persona_cos_all": [round(float(v), 6) for v in cos],
            }
            cells.append(cell)
        t0 = tick("pair metrics", t0)
        # Paired tests: for two pairs sharing a recipe, is one more aligned than the other?
        tests = [(a, b) for a, b in itertools.combinations(pairs, 2) if set(a) & set(b)]
        if tests:
            d = np.stack([pp_cos[a] - pp_cos[b] for a, b in tests])
            pvals = paired_permutation(d, cfg.n_perm, cfg.seed + layer)
            for (a, b), dv, pv in zip(tests, d, pvals, strict=True):
                paired.append({"layer": layer, "pair_1": list(a), "pair_2": list(b),
                               "mean_diff": float(dv.mean()), "p": float(pv)})
        tick("paired tests", t0)

    t0 = time.perf_counter()
    bstar = bstar_check(source, layers)
    tick("B* check", t0)
    result: dict[str, Any] = {
        "input": {"manifest_hash": source.manifest_hash, "provenance": source.provenance},
        "n_personas": n,
        "n_questions": len(source.questions),
        "personas": list(source.personas),
        "layers": layers,
        "positions": positions,
        "n_permutations": cfg.n_perm,
        "min_attainable_p": 1.0 / (cfg.n_perm + 1),
        "seed": cfg.seed,
        "n_splits": cfg.n_splits,
        "thresholds": asdict(th),
        "cells": cells,
        "paired_tests": paired,
        "noise_floor": floors,
        "bstar_check": bstar,
        "missing_rows": missing_rows(source, positions),
    }
    result["overall"] = overall(result)
    return result


def missing_rows(source: Any, positions: list[str]) -> dict[str, dict[str, int]]:
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


def overall(result: dict[str, Any]) -> dict[str, Any]:
    """Recipe-robust or not, and which recipes agree (PASS edges) per layer and at every layer."""
    positions = result["positions"]
    cells = result["cells"]
    per_layer = {}
    for layer in result["layers"]:
        edges = [tuple(c["pair"]) for c in cells if c["layer"] == layer and c["verdict"] == "PASS"]
        per_layer[str(layer)] = _components(positions, edges)
    always = [tuple(c["pair"]) for c in cells
              if all(d["verdict"] == "PASS" for d in cells if d["pair"] == c["pair"])]
    lb = [c for c in cells if c["tag"] == "load-bearing"]
    robust = bool(lb) and all(c["verdict"] == "PASS" for c in lb)
    kills = sorted({f"{c['pair'][0]}~{c['pair'][1]}" for c in lb if c["verdict"] == "KILL"})
    parts = _components(positions, always)
    groups = " | ".join("{" + ", ".join(g) + "}" for g in parts)
    if not lb:
        sentence = "No load-bearing pair was compared, so recipe robustness is not assessed."
    elif robust:
        sentence = "Recipe-robust: every load-bearing pair passes at every layer."
    else:
        sentence = (f"Not recipe-robust: {sum(c['verdict'] != 'PASS' for c in lb)} of {len(lb)} "
                    "load-bearing cells fail to pass"
                    + (f" (KILL: {', '.join(kills)})" if kills else "") + ".")
    sentence += f" Recipes that agree at every layer: {groups}."
    return {"recipe_robust": robust, "sentence": sentence, "partition": parts,
            "partition_per_layer": per_layer}
