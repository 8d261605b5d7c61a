"""A persona subspace shared by every recipe: one PCA fitted on all recipes' centroids.

Per layer, each recipe's centroids ``[persona, d]`` are mean-centred across personas and, by
default, scaled to unit total variance (so the PCA ranks directions by how many recipes share
them, not by which recipe has the largest norm); the recipes are stacked into
``[recipe × persona, d]`` and one PCA gives the shared PCs.

``k_found`` counts the shared PCs that every pair of recipes orders the personas alike on. It is
held out: the centring, the scaling and the PCA are fitted on half of the personas, the scores
taken on the other half, and only the first n_fit − 1 PCs are counted. A PC's agreement is the
smallest Pearson r over the recipe pairs between the two recipes' scores on it; a direction only
one recipe varies along scores r near 0 whatever its variance. The null relabels one recipe's
personas at random and reruns the held-out procedure, PCA included; each PC's agreement is tested
against the relabelled draws' agreement on the same PC, p = (1 + #draws ≥ it) / (draws + 1),
and k_found is the number of leading PCs with p below the level, counting stopping at the first that fails.
The PCs come in a fixed order (fitted without the scored personas), so testing them in that
order needs no split of the level within a layer; the level, :data:`ALPHA` / layers, is split
over the layers (Bonferroni), so recipes unrelated to each other give k_found ≥ 1 at any layer
of a run with probability ≤ ALPHA. Two limits of that guarantee. (1) The null relabels one
recipe, so it is exact when that recipe is unrelated to the rest; with three or more recipes of
which only some share a geometry, the smallest r over the pairs is tested against draws that
break more pairs than the data do, and a layer is called more often than the level (6.5 % per
layer against 1.25 % in a planted case: two of three recipes sharing 3 dimensions, 26
personas). (2) Each PC is tested against the draws' same PC under the all-unrelated null; once
PC1 is truly shared, its estimation error leaks into the next PCs' held-out scores, so what the
test guarantees is "k_found ≥ 1"; the count beyond 1 is descriptive. The draws are raised
to :func:`draws_needed` when fewer are asked for
(a PC cannot pass otherwise). A fixed r > 0.90 per PC, the rule before, lost real dimensions on
few scored personas: with 20 the sampling spread of r alone fails it on a planted 5-dimensional
subspace in half the splits, and the fifth PC fitted on 20 personas mixes in the recipes' own
dimensions (r ≈ 0.6, far above what unrelated recipes reach). At 40 personas (4 layers, 100
draws) the fixed rule found 2–5 of 5 (mean 3.5), the per-PC test 5 ± 1 at 93 % of layers (mean
5.0); unrelated recipes reached k_found ≥ 1 at 1.5 % of layers. The fixed rule remains for
what has no null: ``k_found_in_sample`` (every persona fitted and scored) and a run without
draws.

Each relabelled draw's own k_found is counted the same way (against the data and the other
draws), ``k_found_null`` lists them, and ``k_found_null_p`` = (1 + #draws reaching k_found) /
(N + 1); it is Holm-adjusted over every layer of the run, a layer that found nothing entering
with p = 1, into ``k_found_null_p_holm`` (the report's "beyond the null" at :data:`ALPHA`).
When all countable PCs pass, ``k_found_saturated`` says the subspace may be larger than the
personas can show.

Descriptive curves: for K = 2 … k_max every recipe is projected onto the top-K shared PCs and
the pairs are scored there (per-persona cosine, cosine-matrix Pearson r; ``k_largest_passing``
is the largest K with min cos > 0.85 and r > 0.90). K = 1 is not scored: a 1-D projection makes
every per-persona cosine ±1.

``align="procrustes"`` adds, per layer, the same held-out ``k_found`` (with its relabelled null
and in-sample value) for recipes rotated onto the first one before the PCA
(:mod:`tlpersona.analyses.aligned`): it finds a persona geometry that every recipe has in its own
rotated basis, which the plain joint PCA misses.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from tlpersona.analyses import metrics as M
from tlpersona.errors import TlpersonaError
from tlpersona.positions import canonical
from tlpersona.sources import ActivationSource
from tlpersona.version import __version__


@dataclass
class SubspaceConfig:
    positions: list[str] | None = None
    layers: list[int] | None = None
    k_max: int = 50
    unit_norm: bool = True
    min_cos: float = 0.85
    min_r: float = 0.90
    seed: int = 0
    # relabelled reruns behind the per-PC test and the k_found null (p cannot go below
    # 1/(N+1)); raised to draws_needed(layers) when below it, 0 runs none (only the PCs wanted)
    n_null: int = 100
    align: str = "none"  # "procrustes": also the rotation-aligned subspace (analyses.aligned)


@dataclass
class Centring:
    """What a recipe is centred and scaled with: fitted on some personas, applied to any."""

    mean: np.ndarray  # [d]
    scale: float

    @classmethod
    def fit(cls, x: np.ndarray, unit_norm: bool) -> Centring:
        mean = x.mean(axis=0)
        norm = float(np.linalg.norm(x - mean))
        return cls(mean, 1.0 / norm if unit_norm and norm > 0 else 1.0)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) * self.scale


def prepare(x: np.ndarray, unit_norm: bool) -> np.ndarray:
    """``x`` centred over its personas (and scaled to unit Frobenius norm if ``unit_norm``)."""
    return Centring.fit(x, unit_norm).apply(x)


def agreement_curve(mats: dict[str, np.ndarray], components: np.ndarray,
                    pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For K = 2 … len(components): per pair, per-persona cos (mean, min) and cosine-matrix
    Pearson r of the (already centred) recipes projected onto the top-K components (``[K, d]``).
    The rows are not re-centred, so held-out rows keep the fit half's centring."""
    out = []
    for k in range(2, components.shape[0] + 1):
        proj = {p: m @ components[:k].T for p, m in mats.items()}
        # each recipe's cosine matrix once per K (a recipe is in several pairs)
        tri = {p: M.upper(M.cos_matrix(x)) for p, x in proj.items()}
        row: dict[str, Any] = {"k": k, "pairs": {}}
        for x, y in pairs:
            cos = M.rowwise_cos(proj[x], proj[y])
            r = M.pearson(tri[x], tri[y]) if len(cos) > 2 else float("nan")
            row["pairs"][f"{x}~{y}"] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                                        "mc_r": r}
        out.append(row)
    return out


def _passes(row: dict[str, Any], min_cos: float, min_r: float) -> bool:
    return all(v["cos_min"] > min_cos and v["mc_r"] > min_r for v in row["pairs"].values())


def k_largest_passing(curve: list[dict[str, Any]], min_cos: float, min_r: float) -> int | None:
    """Largest K (≥ 2) at which every pair keeps min cos and matrix r above the thresholds."""
    passing = [row["k"] for row in curve if _passes(row, min_cos, min_r)]
    return max(passing) if passing else None


def per_pc_agreement(mats: dict[str, np.ndarray], components: np.ndarray,
                     pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each shared PC alone: per pair, the Pearson r across personas of the two recipes'
    scores on it. A PC both recipes share orders the personas alike (r near 1); a direction
    only one recipe varies along gives r near 0 whatever its variance."""
    scores = {p: m @ components.T for p, m in mats.items()}  # [persona, K]
    out = []
    for j in range(components.shape[0]):
        row: dict[str, Any] = {"pc": j + 1, "pairs": {}}
        for x, y in pairs:
            a, b = scores[x][:, j], scores[y][:, j]
            ok = np.std(a) > 0 and np.std(b) > 0 and len(a) > 2
            row["pairs"][f"{x}~{y}"] = float(np.corrcoef(a, b)[0, 1]) if ok else float("nan")
        out.append(row)
    return out


#: family-wise level of k_found over the layers of a run (and of the report's "beyond the null")
ALPHA = 0.05


def pc_level(n_layers: int) -> float:
    """The level each layer's per-PC tests run at: :data:`ALPHA` split over the layers
    (Bonferroni), so that unrelated recipes give k_found ≥ 1 at any layer of the run with
    probability ≤ ALPHA. Within a layer no further split is needed: the PCs are tested in their
    fixed order and counting stops at the first that fails."""
    return ALPHA / max(n_layers, 1)


def draws_needed(n_layers: int) -> int:
    """The fewest relabelled draws at which a PC can pass at :func:`pc_level`: the smallest
    per-PC p, 1 / (draws + 1), must be below ALPHA / layers (80 at 4 layers, 20 at one)."""
    return int(np.floor(max(n_layers, 1) / ALPHA + 1e-9))


def pc_statistic(per_pc: list[dict[str, Any]]) -> np.ndarray:
    """Per PC, the smallest held-out r over the recipe pairs ``[PC]`` (every pair must agree;
    an undefined r counts as the lowest possible)."""
    out = np.array([min(row["pairs"].values()) if row["pairs"] else np.nan for row in per_pc],
                   dtype=np.float64)
    return np.where(np.isnan(out), -np.inf, out)


def rank_p(stats: np.ndarray) -> np.ndarray:
    """``stats`` ``[member, PC]`` (row 0 observed, rows 1… relabelled draws, exchangeable when
    nothing is shared): each member's per-PC p = #{members ≥ it} / members, ties and itself
    counted against it, so the observed row's p is (1 + #draws ≥ it) / (draws + 1)."""
    srt = np.sort(stats, axis=0)
    n = stats.shape[0]
    return np.stack([n - np.searchsorted(srt[:, j], stats[:, j], side="left")
                     for j in range(stats.shape[1])], axis=1) / n if stats.size else stats


def leading_passes(p: np.ndarray, level: float) -> np.ndarray:
    """Per member (row of ``p`` ``[member, PC]``), how many leading PCs have p < ``level``:
    the count stops at the first PC that fails. Strictly below, so that a layer's k_found ≥ 1
    always has its null p, Holm-adjusted over the layers, below ALPHA too."""
    ok = p * (1 + 1e-12) < level
    return np.where(ok.all(axis=1), ok.shape[1], np.argmin(ok, axis=1)) if ok.size else \
        np.zeros(p.shape[0], dtype=int)


@dataclass
class PCCount:
    """``k_found`` of a layer by the per-PC test, for the data and for every relabelled draw."""

    k: int | None
    null: list[int | None]
    per_pc_p: list[float]  # the data's per-PC p against the draws
    # per PC, the agreement (smallest r over pairs) a PC must exceed to pass; None: undefined
    per_pc_threshold: list[float | None]
    null_p: float | None  # (1 + #draws reaching k) / (draws + 1); None when k is None


def pass_threshold(draws: np.ndarray, level: float) -> np.ndarray:
    """Per PC, the agreement a data PC must exceed to have p < ``level`` against ``draws``
    ``[draw, PC]``: the c-th largest draw, c = ⌈level · (draws + 1)⌉ − 1 (+inf when c = 0: it
    cannot pass; −inf when every draw may tie or beat it)."""
    n = draws.shape[0]
    c = int(np.ceil(level * (n + 1) * (1 - 1e-12))) - 1
    if c < 1:
        return np.full(draws.shape[1], np.inf)
    if c > n:
        return np.full(draws.shape[1], -np.inf)
    return -np.sort(-draws, axis=0)[c - 1]


def count_against_null(held: list[dict[str, Any]], null: list[list[dict[str, Any]]],
                       level: float, min_r: float) -> PCCount:
    """k_found: the leading shared PCs whose held-out agreement (the smallest r over the pairs)
    beats the relabelled draws' agreement on the same PC at ``level``; each draw's own k is
    counted the same way against the data and the other draws. Without draws, the fixed
    r > ``min_r`` rule counts (descriptive: there is nothing to test against)."""
    if not null:
        return PCCount(k_found(held, min_r), [], [], [], None)
    width = min([len(held), *(len(x) for x in null)])
    stats = np.stack([pc_statistic(x[:width]) for x in [held, *null]])  # [1 + draws, PC]
    p = rank_p(stats)
    ks = [int(c) or None for c in leading_passes(p, level)]
    found = ks[0]
    beaten = sum((k or 0) >= found for k in ks[1:]) if found else None
    bar = pass_threshold(stats[1:], level)
    return PCCount(found, ks[1:], [float(v) for v in p[0]] if p.size else [],
                   [float(v) if np.isfinite(v) else None for v in bar],
                   None if beaten is None else (1 + beaten) / len(ks))


def holm_over_layers(layers: list[dict[str, Any]]) -> None:
    """Add ``k_found_null_p_holm`` to each layer's dict: its null p Holm-adjusted over every
    layer with a null (one family: "the recipes share a subspace at this layer"). A layer that
    found nothing stays in the family with p = 1: leaving it out would test the others at a
    level the run never paid for. Layers without draws are not tested (None)."""
    from tlpersona.analyses.stats import holm

    ps = [np.nan if not lay["k_found_null"] else
          1.0 if lay["k_found_null_p"] is None else lay["k_found_null_p"] for lay in layers]
    for lay, adj in zip(layers, holm(ps), strict=True):
        lay["k_found_null_p_holm"] = None if np.isnan(adj) else float(adj)


def found_text(layer: dict[str, Any]) -> str:
    """A layer's k_found as the report states it: the count (``≥`` when every countable PC is
    shared), and whether it is beyond its relabelled null after Holm over layers."""
    k = layer["k_found"]
    if not k:
        return "none"
    text = f"≥ {k} (every countable PC shared)" if layer["k_found_saturated"] else str(k)
    p = layer.get("k_found_null_p_holm")
    if p is None:
        return f"{text} (no null run)"
    return f"{text}, {'beyond' if p < ALPHA else 'not beyond'} the null (Holm p = {p:.3f})"


def null_text(layer: dict[str, Any]) -> str:
    """The relabelled draws' k_found values, compressed (``none ×93, 1 ×7``), and the raw p."""
    counts: dict[str, int] = {}
    for k in layer["k_found_null"]:
        key = "none" if k is None else str(k)
        counts[key] = counts.get(key, 0) + 1
    text = ", ".join(f"{key} ×{n}" for key, n in sorted(counts.items(), key=_null_order))
    if layer["k_found_null_p"] is not None:
        text += f" (p = {layer['k_found_null_p']:.3f})"
    return text or "—"


def _null_order(item: tuple[str, int]) -> tuple[int, int]:
    return (0, 0) if item[0] == "none" else (1, int(item[0]))


def limits_text(n_null: int, layers: list[dict[str, Any]]) -> str:
    """What the k_found column can and cannot say with these draws and personas."""
    m = sum(bool(lay["k_found_null"]) for lay in layers)
    floor = 1.0 / (n_null + 1) if n_null else 1.0
    lines = ["k_found is a lower bound on the shared dimension: each PC is scored on the "
             "held-out personas alone, and a shared PC that the fit half estimates mixed with "
             "the recipes' own dimensions can fail (planted 5 shared dimensions: 5 ± 1 found at "
             "93 % of layers at 40 personas, 80 % at 26)."]
    if m and m * floor >= ALPHA:
        lines.append(f"With {n_null} relabellings p cannot fall below {floor:.3f}, so after Holm "
                     f"over {m} layer(s) no k_found can be called beyond the null at "
                     f"{ALPHA:g}; run more draws (`null_draws`).")
    return " ".join(lines)


def _layer_k(lay: dict[str, Any]) -> str:
    return f"L{lay['layer']} {'≥' if lay['k_found_saturated'] else ''}{lay['k_found']}"


def answer(data: dict[str, Any]) -> str:
    """One sentence (≤ 220 characters) on a subspace result (what :func:`subspace` returns,
    subspace.json): is there a shared subspace, of what dimension per layer, beyond its null;
    or, when none is, what a PC would have needed to pass and what the personas allow."""
    layers = data["layers"]
    n_layers = len(layers)
    n = data["n_personas"]
    held = layers[0]["held_out"] if layers else {"n_fit": n // 2, "n_scored": n - n // 2}
    who = f"{n} personas, {held['n_fit']} fit"
    if not data["null"]["n"]:
        ks = [lay for lay in layers if lay["k_found"]]
        text = (f"No relabelled null was run, so no shared subspace can be called ({who}); "
                f"r > {data['thresholds']['min_r']} per PC alone gives "
                + (", ".join(_layer_k(lay) for lay in ks) if ks else "none") + ".")
        return _fit(text, f"No relabelled null was run, so no shared subspace can be called "
                          f"({who}).")
    beyond = [lay for lay in layers
              if lay["k_found"] and (lay.get("k_found_null_p_holm") or 1.0) < ALPHA]
    if beyond:
        worst = max(lay["k_found_null_p_holm"] for lay in beyond)
        head = f"Shared subspace beyond the null at {len(beyond)}/{n_layers} layers"
        # the test calls the layer (PC1 shared beyond the null); k itself is descriptive
        tail = f" (Holm p ≤ {worst:.2g}; {who}; the count is descriptive beyond 1)."
        full = f"{head}: {', '.join(_layer_k(lay) for lay in beyond)}{tail}"
        ks = [lay["k_found"] for lay in beyond]
        short = (f"{head}, k = {min(ks)}–{max(ks)}"
                 f"{' (some ≥: saturated)' if any(lay['k_found_saturated'] for lay in beyond) else ''}"
                 f"{tail}")
        return _fit(full, short)
    # nothing found: how far PC1 was from passing, and what the personas allow at most
    best = None
    for lay in layers:
        if lay["per_pc"] and lay.get("per_pc_threshold"):
            got = float(pc_statistic(lay["per_pc"][:1])[0])
            bar = lay["per_pc_threshold"][0]
            if best is None or (bar is not None and got - bar > best[1] - best[2]):
                best = (lay["layer"], got, bar if bar is not None else float("-inf"))
    cap = f"at most {held['n_fit'] - 1} PC(s) can be counted, each on {held['n_scored']} held-out"
    if best is None or not np.isfinite(best[1]) or not np.isfinite(best[2]):
        return _fit(f"No shared subspace at {n_layers} layer(s): with {who}, {cap} personas; "
                    "more personas would be needed to see one.",
                    f"No shared subspace at {n_layers} layer(s) ({who}): more personas needed.")
    layer, got, bar = best
    return _fit(f"No shared subspace beyond the null at {n_layers} layer(s): PC1's agreement "
                f"reached r {got:.2f} at best (L{layer}) against {bar:.2f} needed; with {who}, "
                f"{cap} personas.",
                f"No shared subspace beyond the null at {n_layers} layer(s): PC1 reached r "
                f"{got:.2f} at best (L{layer}), {bar:.2f} needed ({who}).")


def _fit(text: str, shorter: str, limit: int = 220) -> str:
    """``text`` if it fits in ``limit`` characters, else ``shorter`` (cut if it too does not)."""
    if len(text) <= limit:
        return text
    return shorter if len(shorter) <= limit else shorter[: limit - 1] + "…"


def k_found(per_pc: list[dict[str, Any]], min_r: float) -> int | None:
    """How many of the shared PCs every recipe pair orders personas alike on (r > ``min_r``):
    the dimension of the subspace the recipes share. None if no PC is shared."""
    n = sum(all(r > min_r for r in row["pairs"].values()) for row in per_pc)
    return n or None


def top_components(x: np.ndarray, k: int) -> np.ndarray:
    """The top ``k`` principal directions ``[k, d]`` of the rows of ``x`` ``[n, d]`` (centred
    first), as sklearn's full-SVD PCA gives them up to sign. With fewer rows than dimensions they
    come from the ``n × n`` Gram matrix: the null reruns this hundreds of times at 275 personas ×
    d 3584, where it is ~6× faster than the SVD; where the top ``k`` are not all of full rank,
    the SVD decides."""
    c = x - x.mean(axis=0)
    n, d = c.shape
    if n < d:
        w, u = np.linalg.eigh(c @ c.T)
        order = np.argsort(w)[::-1][:k]
        s = np.sqrt(np.clip(w[order], 0.0, None))
        if s.size == k and s[0] > 0 and s[-1] > s[0] * 1e-6:
            return ((c.T @ u[:, order]) / s).T
    return PCA(n_components=k, svd_solver="full").fit(x).components_


def held_out(raw: dict[str, np.ndarray], positions: list[str], pairs: list[tuple[str, str]],
             fit: np.ndarray, test: np.ndarray, k_max: int, unit_norm: bool, curve: bool = True
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shared PCs fitted on the ``fit`` personas only (their mean, scale and PCA), agreement
    scored on the ``test`` personas only. Returns the per-PC agreement and the K curve (empty
    without ``curve``: the null reruns need only the per-PC agreement)."""
    centring = {p: Centring.fit(x[fit], unit_norm) for p, x in raw.items()}
    stacked = np.concatenate([centring[p].apply(raw[p][fit]) for p in positions])
    k = min(k_max, stacked.shape[0] - 1, stacked.shape[1])
    components = top_components(stacked, k)
    test_rows = {p: centring[p].apply(raw[p][test]) for p in positions}
    # a recipe's fit half spans n_fit - 1 directions: PCs past that are not its own estimate
    countable = components[: len(fit) - 1]
    return (per_pc_agreement(test_rows, countable, pairs),
            agreement_curve(test_rows, components, pairs) if curve else [])


def subspace(source: ActivationSource, cfg: SubspaceConfig | None = None
             ) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Shared PCs per layer, agreement curves, k_found (held out) with its null, in-sample
    values, variance shares and the sink check.

    Returns ``(results, {layer: components [k, d]})`` (components of the all-persona PCA).
    """
    from tlpersona.analyses.compare import default_positions

    cfg = cfg or SubspaceConfig()
    positions = ([canonical(p) for p in cfg.positions] if cfg.positions
                 else default_positions(list(source.positions)))
    if len(positions) < 2:
        raise TlpersonaError("the subspace needs at least two positions")
    missing = [p for p in positions if p not in source.positions]
    if missing:
        raise TlpersonaError(f"position {missing[0]} is not in the input")
    from tlpersona.analyses.aligned import ALIGNMENTS, aligned_layer

    if cfg.align not in ALIGNMENTS:
        raise TlpersonaError(f"align must be one of {', '.join(ALIGNMENTS)}, not {cfg.align!r}")
    if cfg.k_max < 1:
        raise TlpersonaError(f"k_max must be at least 1, got {cfg.k_max}")
    n = len(source.personas)
    if n < 4:
        raise TlpersonaError(f"the subspace needs at least 4 personas, got {n}")
    layers = cfg.layers or list(source.layers)
    pairs = list(itertools.combinations(positions, 2))
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    fit_half, test_half = perm[: n // 2], perm[n // 2:]
    # enough draws that a PC can pass at ALPHA split over the layers (none: only the PCs wanted)
    n_draws = max(cfg.n_null, draws_needed(len(layers))) if cfg.n_null > 0 else 0
    level = pc_level(len(layers))
    relabels = [rng.permutation(n) for _ in range(n_draws)]
    results: dict[str, Any] = {"positions": positions, "n_personas": n, "unit_norm": cfg.unit_norm,
                               "align": cfg.align,
                               "thresholds": {"min_cos": cfg.min_cos, "min_r": cfg.min_r},
                               "null": {"n": n_draws, "requested": cfg.n_null,
                                        "relabelled": positions[-1], "pc_level": level},
                               "seed": cfg.seed,
                               "input": {"manifest_hash": source.manifest_hash},
                               "layers": []}
    comps: dict[int, np.ndarray] = {}
    for layer in layers:
        li = source.layer_index(layer)
        raw = {p: source.centroids(p)[:, li].double().numpy() for p in positions}
        mats = {p: prepare(x, cfg.unit_norm) for p, x in raw.items()}
        stacked = np.concatenate([mats[p] for p in positions])
        k_max = min(cfg.k_max, stacked.shape[0] - 1, stacked.shape[1])
        pca = PCA(n_components=k_max, svd_solver="full").fit(stacked)
        comps[layer] = pca.components_
        curve = agreement_curve(mats, pca.components_, pairs)
        in_pc = per_pc_agreement(mats, pca.components_[: n - 1], pairs)
        held_pc, held = held_out(raw, positions, pairs, fit_half, test_half, k_max, cfg.unit_norm)
        # Null: the last recipe's personas relabelled, everything else as for the headline.
        null_pcs = []
        for relabel in relabels:
            shuffled = {**raw, positions[-1]: raw[positions[-1]][relabel]}
            null_pcs.append(held_out(shuffled, positions, pairs, fit_half, test_half, k_max,
                                     cfg.unit_norm, curve=False)[0])
        count = count_against_null(held_pc, null_pcs, level, cfg.min_r)
        variance = {}
        for p in positions:
            x = mats[p]
            total = float(np.sum(x * x))
            shared = np.cumsum(np.sum((x @ pca.components_.T) ** 2, axis=0)) / total
            own = PCA(n_components=min(k_max, n - 1), svd_solver="full").fit(x)  # exact, reproducible
            own_cum = np.cumsum(own.explained_variance_ratio_)
            angles = [float(np.degrees(subspace_angles(own.components_[:k].T,
                                                       pca.components_[:k].T)).max())
                      for k in range(1, min(k_max, own.components_.shape[0]) + 1)]
            variance[p] = {"shared_cumulative": shared.tolist(), "own_cumulative": own_cum.tolist(),
                           "max_principal_angle_deg": angles}
        k_held = count.k
        results["layers"].append({
            "layer": layer,
            "k_max": k_max,
            "k_found": k_held,
            "k_found_held_out": k_held,
            # every countable PC shared: the subspace may be larger than the fit half can show
            "k_found_saturated": bool(k_held) and k_held == len(held_pc),
            "k_found_in_sample": k_found(in_pc, cfg.min_r),
            "k_found_null": count.null,
            "k_found_null_p": count.null_p,
            "per_pc_p": count.per_pc_p,
            "per_pc_threshold": count.per_pc_threshold,
            "k_largest_passing": k_largest_passing(held, cfg.min_cos, cfg.min_r),
            "k_largest_passing_in_sample": k_largest_passing(curve, cfg.min_cos, cfg.min_r),
            "per_pc": held_pc,
            "per_pc_in_sample": in_pc,
            "held_out": {"n_fit": len(fit_half), "n_scored": len(test_half)},
            "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
            "pc1_sink_cos": _sink_cos(source, li, pca.components_[0]),
            "curve": curve,
            "held_out_curve": held,
            "variance": variance,
        })
        if cfg.align == "procrustes":
            results["layers"][-1]["aligned"] = aligned_layer(
                raw, positions, pairs, fit_half, test_half, relabels, cfg.unit_norm, cfg.min_r,
                level).to_dict()
    holm_over_layers(results["layers"])
    if cfg.align == "procrustes":
        holm_over_layers([lay["aligned"] for lay in results["layers"]])
    results["code_version"] = __version__
    return results, comps


def _sink_cos(source: ActivationSource, li: int, pc1: np.ndarray) -> float | None:
    """|cos| between the first shared PC and the first token's residual (None without it)."""
    if "first" not in source.positions:
        return None
    sink = source.centroids("first")[:, li].double().numpy().mean(0)
    norm = np.linalg.norm(sink) * np.linalg.norm(pc1)
    return float(abs(sink @ pc1) / norm) if norm > 0 else None
