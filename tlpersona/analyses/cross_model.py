"""One recipe's persona geometry in two models: two stores of the same personas and questions
(base and instruct, two sizes, before and after fine-tuning), one cell per recipe × layer pair.

Only statistics that do not need the two models' residual bases to correspond are computed:
each model's own persona × persona matrices (mean-centred cosine matrices, Gram matrices) and a
rotation fitted on held-out personas. A per-persona cosine between one model's vector and the
other's is left out: it compares coordinates of two unrelated bases (of different widths, or of
one width that no training objective ties across models). See docs/methods/cross_model.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from tlpersona.analyses import metrics as M
from tlpersona.analyses.ceilings import Halves, ceiling, cka_cell, cka_reliability, mc_r_sd
from tlpersona.analyses.compare import default_positions
from tlpersona.analyses.compare.cells import QuestionPass, question_pass
from tlpersona.analyses.compare.verdicts import mantel_floor
from tlpersona.analyses.controls import FloorReason, FloorStats
from tlpersona.analyses.stats import MantelPermuter, MantelResult, draws_for_family, holm, z_score
from tlpersona.cache.source import ActivationSource, stored_layer
from tlpersona.chat.positions import canonical
from tlpersona.errors import TlpersonaError
from tlpersona.version import __version__

#: Recipes whose vectors read each model's own generated responses.
RESPONSE_RECIPES = ("response_mean", "response_mean_seed")

#: What the result says about the statistic it does not report.
LEFT_OUT = ("Per-persona cosine is not reported: it compares one model's vector with the "
            "other's coordinate by coordinate, and two models' residual bases do not correspond "
            "(their widths may differ; where they are equal, no training objective ties one "
            "model's basis to another's, a fine-tune's included). Every statistic here is a "
            "function of each model's own persona × persona matrices, or of a rotation fitted "
            "on held-out personas.")

CALLS = ("agree", "differ", "cannot tell")


@dataclass(frozen=True)
class CrossModelConfig:
    """``layers_a`` / ``layers_b``: stored block numbers paired in order (negative: from each
    model's end); None for both: the block numbers both stores hold, when the two models have
    the same depth. ``n_perm``: Mantel permutations (None: sized to the family,
    :func:`draws_for_family` over every cell). ``n_null``: relabelled draws behind the held-out
    Procrustes null. ``alpha``: the family-wise level of "beyond chance" and the one-sided
    per-cell level of "below its ceiling"."""

    positions: list[str] | None = None
    layers_a: list[int] | None = None
    layers_b: list[int] | None = None
    n_perm: int | None = None
    seed: int = 0
    n_splits: int = 10
    n_null: int = 100
    alpha: float = 0.05


@dataclass(frozen=True)
class StoreSide:
    """One of the two stores as its manifest names it."""

    label: str  # "A" or "B"
    path: str  # the store's directory (a seed layout's, or "(in memory)")
    model: str | None  # the model spec it was extracted with (None: not recorded)
    model_identity: str | None  # file hash, revision or config hash
    d_model: int
    n_layers_total: int | None  # the model's block count (None: not recorded)
    layers: list[int]  # its stored layers
    dtype: str | None
    manifest_hash: str

    @property
    def name(self) -> str:
        """The model's name for sentences (its spec, else the store's path)."""
        return self.model or self.path


@dataclass(frozen=True)
class CrossCell:
    """One recipe at one layer of each model: every statistic beside its null (the other
    model's persona labels shuffled) and, where it has one, its ceiling (the geometric mean of
    the two stores' split-half values, Spearman–Brown corrected to full size). One row of
    cells.csv, in this order."""

    recipe: str
    layer_a: int
    layer_b: int
    call: str  # agree, differ or cannot tell
    reason: str  # why, in words
    mc_r: float | None  # Pearson r of the mean-centred cosine matrices' upper triangles
    mc_spearman: float | None
    mc_r_null_mean: float | None
    mc_r_null_p95: float | None
    mc_r_z: float | None
    mc_r_p: float | None  # one-sided Mantel p
    mc_r_p_holm: float | None  # Holm over every cell
    mc_r_ceiling: float | None
    mc_r_sd: float | None  # sampling SD over question halves (delete-half jackknife)
    mc_r_gap_z: float | None  # (mc_r − ceiling) / sd (None: unknown, or no sampling noise)
    mc_r_gap_p: float | None  # one-sided p of "below its ceiling": Φ(gap z)
    mc_r_gap_p_holm: float | None  # Holm over every cell
    below_ceiling: bool  # below its ceiling beyond sampling error (gap p after Holm < alpha)
    raw_r: float | None  # the same for the raw cosine matrices (descriptive)
    raw_r_null_p95: float | None
    raw_r_p: float | None
    raw_r_p_holm: float | None
    procrustes_cos: float | None  # held-out Procrustes cosine (None: too few personas)
    procrustes_null_mean: float | None
    procrustes_null_p95: float | None
    procrustes_z: float | None
    procrustes_p: float | None  # uncorrected (descriptive unless the draws reach Holm)
    procrustes_p_holm: float | None  # None where the draws cannot reach alpha after Holm
    procrustes_ceiling: float | None
    procrustes_rank: int  # dimensions the rotation is fitted in
    spread_spearman: float | None  # per-question persona spread, model A against model B
    # for comparability with other tools, not part of the call
    cka_linear: float | None
    cka_linear_null_p95: float | None
    cka_linear_p: float | None
    cka_linear_p_holm: float | None
    cka_linear_ceiling: float | None  # half size: below what identical geometry reaches
    cka_debiased: float | None
    cka_debiased_null_p95: float | None
    cka_debiased_p: float | None
    cka_debiased_p_holm: float | None
    cka_debiased_ceiling: float | None  # full size

    @property
    def layers(self) -> str:
        return f"L{self.layer_a}~L{self.layer_b}"

    def __repr__(self) -> str:
        # a notebook shows this line, not 40 fields
        return (f"CrossCell({self.recipe} {self.layers}: {self.call}, mc_r {_f(self.mc_r)} "
                f"(ceiling {_f(self.mc_r_ceiling)}, Holm p {_p(self.mc_r_p_holm)}), procrustes "
                f"{_f(self.procrustes_cos)})")


@dataclass(frozen=True)
class RecipeAnswer:
    """One recipe's first-screen sentence: ``call`` is agree, differ or cannot tell where every
    layer pair gets the same call, else mixed."""

    recipe: str
    call: str
    sentence: str


@dataclass(frozen=True)
class CrossModelResult:
    """What :func:`compare_models` found; ``to_dict()`` is cross_model.json."""

    a: StoreSide
    b: StoreSide
    personas: list[str]
    n_questions: int
    recipes: list[str]
    layer_pairs: list[tuple[int, int]]  # (layer of A, layer of B)
    layer_pairing: str  # how the pairs were chosen, in words
    n_permutations: int
    permutations_auto: bool
    min_attainable_p_holm: float
    n_null: int
    procrustes_corrected: bool  # whether the Procrustes p is Holm-adjusted (enough draws)
    n_splits: int
    seed: int
    alpha: float
    cells: list[CrossCell]
    recipe_answers: list[RecipeAnswer]
    answer: str  # the report's first line
    notes: list[str]
    left_out: str = LEFT_OUT
    code_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_frame(self) -> Any:
        """One row per recipe × layer pair, the columns of cells.csv, as a pandas DataFrame."""
        from tlpersona.infra.resultjson import frame

        return frame(self.cells)

    def cell(self, recipe: str, layer_a: int, layer_b: int | None = None) -> CrossCell:
        """The cell of ``recipe`` at ``layer_a`` of A and ``layer_b`` of B (default: the same
        block number)."""
        lb = layer_a if layer_b is None else layer_b
        name = canonical(recipe)
        for c in self.cells:
            if (c.recipe, c.layer_a, c.layer_b) == (name, layer_a, lb):
                return c
        raise KeyError((recipe, layer_a, lb))


# --- the two stores ---------------------------------------------------------------------------

def side(source: ActivationSource, label: str) -> StoreSide:
    """What a store's manifest says about its model (a seed layout records none)."""
    manifest: dict[str, Any] = getattr(source, "manifest", {}) or {}
    prov = source.provenance
    root = getattr(source, "root", None)
    width = manifest.get("d_model")
    if not isinstance(width, int):
        width = int(source.centroids(source.positions[0]).shape[-1])
    return StoreSide(label, str(root) if root is not None else "(in memory)",
                     prov.get("model"), prov.get("model_identity"), width,
                     manifest.get("n_layers_total"), list(source.layers), prov.get("dtype"),
                     source.manifest_hash)


def _list_difference(field_name: str, a: list[str], b: list[str], sa: StoreSide,
                     sb: StoreSide) -> str:
    why = "a cross-model comparison needs the same personas and questions in the same order"
    if len(a) != len(b):
        return (f"the stores' field `{field_name}` differs: {sa.path} has {len(a)}, {sb.path} "
                f"has {len(b)}; {why}")
    i = next(k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    order = " (the same names in another order)" if sorted(a) == sorted(b) else ""
    return (f"the stores' field `{field_name}` differs{order}: entry {i + 1} is {a[i]!r} in "
            f"{sa.path} and {b[i]!r} in {sb.path}; {why}")


def check_same_items(a: ActivationSource, b: ActivationSource, sa: StoreSide,
                     sb: StoreSide) -> list[str]:
    """Refuse two stores whose personas or questions differ (names and order, then the
    manifests' hashes of the system prompts and question texts, and the phrasing index);
    returns notes on what could not be checked."""
    for name, xa, xb in (("personas", a.personas, b.personas),
                         ("questions", a.questions, b.questions)):
        if list(xa) != list(xb):
            raise TlpersonaError(_list_difference(name, list(xa), list(xb), sa, sb))
    pa, pb = a.provenance, b.provenance
    notes = []
    for name, what in (("persona_hash", "the same persona names with other system prompts"),
                       ("question_hash", "the same question ids with other texts"),
                       ("prompt_index", "another system-prompt phrasing")):
        if name not in pa and name not in pb:
            if name != "prompt_index":
                notes.append(f"Neither store records `{name}`: its items were checked by name "
                             "only.")
            continue
        if pa.get(name) != pb.get(name):
            missing = [s.path for s, p in ((sa, pa), (sb, pb)) if p.get(name) is None]
            tail = (f"{missing[0]} records none, so they cannot be checked" if missing
                    else what)
            raise TlpersonaError(f"the stores' field `{name}` differs ({tail}); a cross-model "
                                 "comparison needs the same personas and questions")
    eot = (pa.get("include_eot"), pb.get("include_eot"))
    if None not in eot and eot[0] != eot[1]:
        raise TlpersonaError("the stores' field `include_eot` differs (response_mean averages "
                             "the end-of-turn token in one store only)")
    return notes


def recipes_of(a: ActivationSource, b: ActivationSource, positions: list[str] | None,
               sa: StoreSide, sb: StoreSide) -> list[str]:
    """``positions`` (canonical), each in both stores; default: the recipes both hold."""
    if positions:
        names = [canonical(p) for p in positions]
        for p in names:
            for src, s in ((a, sa), (b, sb)):
                if p not in src.positions:
                    raise TlpersonaError(f"position {p} is not in {s.path} (it has "
                                         f"{', '.join(src.positions)})")
        return list(dict.fromkeys(names))
    common = default_positions([p for p in a.positions if p in b.positions])
    if not common:
        raise TlpersonaError(f"the stores have no recipe in common ({sa.path}: "
                             f"{', '.join(a.positions)}; {sb.path}: {', '.join(b.positions)})")
    return common


def layer_pairs(a: ActivationSource, b: ActivationSource, layers_a: list[int] | None,
                layers_b: list[int] | None, sa: StoreSide,
                sb: StoreSide) -> tuple[list[tuple[int, int]], str]:
    """The (layer of A, layer of B) pairs and how they were chosen. Given: ``layers_a`` and
    ``layers_b`` in order (negative: counted from each model's end). Default: the block numbers
    both stores hold, only when the models have the same depth (or either depth is unrecorded);
    otherwise block 12 of a 24-block model is not block 12 of a 36-block one, and the pairs
    must be given."""
    if (layers_a is None) != (layers_b is None):
        given, other = ("layers_a", "layers_b") if layers_b is None else ("layers_b", "layers_a")
        raise TlpersonaError(f"`{given}` needs `{other}`: the layers of the two stores are "
                             "paired in order")
    if layers_a is not None and layers_b is not None:
        if not layers_a:
            raise TlpersonaError("`layers_a` and `layers_b` must name at least one layer each")
        if len(layers_a) != len(layers_b):
            raise TlpersonaError(f"`layers_a` has {len(layers_a)} layers and `layers_b` "
                                 f"{len(layers_b)}: they are paired in order")
        pairs = [(_stored(a, x, "layers_a", sa), _stored(b, y, "layers_b", sb))
                 for x, y in zip(layers_a, layers_b, strict=True)]
        return list(dict.fromkeys(pairs)), "given (`layers_a` with `layers_b`, in order)"
    depths = (sa.n_layers_total, sb.n_layers_total)
    hint = (f"give the pairs with `layers_a` and `layers_b` ({sa.path} holds {sa.layers}, "
            f"{sb.path} {sb.layers})")
    if None not in depths and depths[0] != depths[1]:
        raise TlpersonaError(f"the models have different depths ({depths[0]} and {depths[1]} "
                             f"blocks), so their layers are not paired by number: {hint}")
    common = [x for x in a.layers if x in b.layers]
    if not common:
        raise TlpersonaError(f"the stores hold no layer in common: {hint}")
    return [(x, x) for x in common], "the block numbers both stores hold"


def _stored(src: ActivationSource, layer: int, param: str, s: StoreSide) -> int:
    try:
        return stored_layer(src, layer)
    except TlpersonaError:
        raise TlpersonaError(f"`{param}` {layer} is not stored in {s.path} (it has "
                             f"{s.layers})") from None


# --- one store's per-question pass --------------------------------------------------------------

@dataclass
class _StoreNoise:
    """One store's split-half material per recipe: the question pass (None: question-invariant
    or no per-question vectors) and, for a question-invariant recipe, the fact that it is
    exact."""

    passes: dict[str, QuestionPass | None] = field(default_factory=dict)
    # recipe -> layer -> floor
    floors: dict[str, dict[int, FloorStats | FloorReason]] = field(default_factory=dict)


def _noise(src: ActivationSource, recipes: list[str], layers: list[int], cfg: CrossModelConfig,
           iu: tuple[np.ndarray, np.ndarray]) -> _StoreNoise:
    out = _StoreNoise()
    for p in recipes:
        if src.question_invariant(p) or not src.has_per_question(p):
            reason = (FloorReason(True, "question-invariant: no sampling noise")
                      if src.question_invariant(p) else
                      FloorReason(None, "no per-question vectors in the input"))
            out.passes[p] = None
            out.floors[p] = {x: reason for x in layers}
            continue
        # the question splits depend on the seed and the question count only, so both stores
        # split their (identical) questions the same way
        qp = question_pass(src, p, layers, cfg.n_splits, cfg.seed, iu)
        out.passes[p] = qp
        out.floors[p] = qp.floors
    return out


def _halves(noise: _StoreNoise, src: ActivationSource, recipe: str, layer: int,
            cent: np.ndarray, iu: tuple[np.ndarray, np.ndarray]) -> Halves | None:
    qp = noise.passes.get(recipe)
    if qp is not None:
        return qp.halves.get(layer)
    if src.question_invariant(recipe):  # no noise: every half is the centroid
        return Halves.of(cent[:, None], iu)
    return None


# --- the comparison -----------------------------------------------------------------------------

def _matrix(perm: MantelPermuter, ma: np.ndarray, mb: np.ndarray) -> MantelResult | None:
    """Mantel test of A's matrix against B's (B's persona labels permuted); None where either
    is constant (every persona alike), where r is undefined."""
    return perm.tests([ma], mb)[0]


def compare_models(a: ActivationSource, b: ActivationSource,
                   cfg: CrossModelConfig | None = None) -> CrossModelResult:
    """Every recipe both stores hold (or ``cfg.positions``) at every layer pair: the
    mean-centred persona-geometry r with its Mantel null and split-half ceiling, the held-out
    Procrustes cosine with its relabelled null and ceiling, CKA for comparability, and a call
    per cell (agree / differ / cannot tell)."""
    cfg = cfg or CrossModelConfig()
    sa, sb = side(a, "A"), side(b, "B")
    notes = check_same_items(a, b, sa, sb)
    n = len(a.personas)
    if n < 4:
        raise TlpersonaError(f"a cross-model comparison needs at least 4 personas, got {n}")
    recipes = recipes_of(a, b, cfg.positions, sa, sb)
    pairs, pairing = layer_pairs(a, b, cfg.layers_a, cfg.layers_b, sa, sb)
    n_cells = len(recipes) * len(pairs)
    # the family is every cell: enough permutations that Holm over it can reach alpha
    n_perm = cfg.n_perm if cfg.n_perm is not None else draws_for_family(n_cells, cfg.alpha)
    perm = MantelPermuter(n, n_perm, cfg.seed)
    iu = perm.iu
    noise_a = _noise(a, recipes, list(dict.fromkeys(x for x, _ in pairs)), cfg, iu)
    noise_b = _noise(b, recipes, list(dict.fromkeys(y for _, y in pairs)), cfg, iu)
    raw: list[dict[str, Any]] = []
    for k, (la, lb) in enumerate(pairs):
        ia, ib = a.layer_index(la), b.layer_index(lb)
        cent = {(s, r): src.centroids(r)[:, li].double().numpy()
                for s, src, li in (("a", a, ia), ("b", b, ib)) for r in recipes}
        held = M.HeldOutProcrustes(n, M.PROCRUSTES_SPLITS, np.random.default_rng(cfg.seed + k),
                                   cfg.n_null)
        for (s, r), x in cent.items():
            held.add(f"{s}|{r}", x)
        proc = held.score_pairs([(f"a|{r}", f"b|{r}") for r in recipes])
        for r in recipes:
            xa, xb = cent[("a", r)], cent[("b", r)]
            raw.append(_cell(r, la, lb, xa, xb, perm, proc[(f"a|{r}", f"b|{r}")],
                             (noise_a, a), (noise_b, b), cfg))
    procrustes_corrected = n_cells / (cfg.n_null + 1) < cfg.alpha
    for key in ("mc_r_p", "mc_r_gap_p", "raw_r_p", "cka_linear_p", "cka_debiased_p") + (
            ("procrustes_p",) if procrustes_corrected else ()):
        adj = holm([np.nan if c[key] is None else c[key] for c in raw])
        for c, v in zip(raw, adj, strict=True):
            c[f"{key}_holm"] = None if c[key] is None else float(v)
    # recipe by recipe, each in its layer pairs' order
    raw.sort(key=lambda c: (recipes.index(c["recipe"]), pairs.index((c["layer_a"], c["layer_b"]))))
    cells = [_call(c, cfg.alpha) for c in raw]
    floor = mantel_floor(n, n_perm)
    min_holm = min(1.0, floor * n_cells)
    notes += _notes(cells, recipes, sa, sb, n, n_perm, min_holm, procrustes_corrected, cfg)
    answers = [recipe_answer(r, [c for c in cells if c.recipe == r]) for r in recipes]
    return CrossModelResult(
        a=sa, b=sb, personas=list(a.personas), n_questions=len(a.questions), recipes=recipes,
        layer_pairs=pairs, layer_pairing=pairing, n_permutations=n_perm,
        permutations_auto=cfg.n_perm is None, min_attainable_p_holm=min_holm, n_null=cfg.n_null,
        procrustes_corrected=procrustes_corrected, n_splits=cfg.n_splits, seed=cfg.seed,
        alpha=cfg.alpha, cells=cells, recipe_answers=answers,
        answer=headline(answers, sa, sb), notes=notes)


def _cell(recipe: str, la: int, lb: int, xa: np.ndarray, xb: np.ndarray, perm: MantelPermuter,
          proc: M.ProcrustesScore, side_a: tuple[_StoreNoise, ActivationSource],
          side_b: tuple[_StoreNoise, ActivationSource], cfg: CrossModelConfig) -> dict[str, Any]:
    """A cell's numbers before Holm and the call (a dict keyed by :class:`CrossCell`'s fields)."""
    (noise_a, a), (noise_b, b) = side_a, side_b
    iu = perm.iu
    mc_a, mc_b = M.cos_matrix(M.mean_centre(xa)), M.cos_matrix(M.mean_centre(xb))
    geo = _matrix(perm, mc_a, mc_b)
    rawm = _matrix(perm, M.cos_matrix(xa), M.cos_matrix(xb))
    cell_ceiling = ceiling(noise_a.floors[recipe][la], noise_b.floors[recipe][lb])
    sd = mc_r_sd(_halves(noise_a, a, recipe, la, xa, iu), _halves(noise_b, b, recipe, lb, xb, iu))
    gap_z, gap_p = (None, None) if geo is None else gap_test(geo.r, cell_ceiling.matrix_mc_pearson, sd)
    ga, gb = M.centred_gram(xa), M.centred_gram(xb)
    (score,) = M.cka_scores([ga], gb, perm.perms, perm.flat)
    rel = [cka_reliability(None if qp is None else qp.cka.get(layer), g, src.question_invariant(recipe))
           for qp, g, src, layer in ((noise_a.passes.get(recipe), ga, a, la),
                                     (noise_b.passes.get(recipe), gb, b, lb))]
    cka = cka_cell(score, rel[0], rel[1], perm.n_perm)
    pd = proc.to_dict()
    spread = _spread(noise_a.passes.get(recipe), noise_b.passes.get(recipe), la, lb)
    lin, deb = cka.linear, cka.debiased
    return {
        "recipe": recipe, "layer_a": la, "layer_b": lb,
        "mc_r": None if geo is None else geo.r,
        "mc_spearman": None if geo is None else float(stats.spearmanr(mc_a[iu], mc_b[iu])[0]),
        "mc_r_null_mean": None if geo is None else geo.null_mean,
        "mc_r_null_p95": None if geo is None else geo.null_p95,
        "mc_r_z": None if geo is None else z_score(geo.r, geo.null_mean, geo.null_sd),
        "mc_r_p": None if geo is None else geo.p,
        "mc_r_ceiling": cell_ceiling.matrix_mc_pearson, "mc_r_sd": sd,
        "mc_r_gap_z": gap_z, "mc_r_gap_p": gap_p,
        "raw_r": None if rawm is None else rawm.r,
        "raw_r_null_p95": None if rawm is None else rawm.null_p95,
        "raw_r_p": None if rawm is None else rawm.p,
        "procrustes_cos": pd.get("mean"), "procrustes_null_mean": pd.get("null_mean"),
        "procrustes_null_p95": pd.get("null_p95"), "procrustes_z": pd.get("z"),
        "procrustes_p": pd.get("p"), "procrustes_p_holm": None,
        "procrustes_ceiling": cell_ceiling.procrustes_cos_mean,
        "procrustes_rank": proc.rank, "procrustes_reason": proc.reason,
        "spread_spearman": spread,
        "cka_linear": lin.value, "cka_linear_null_p95": lin.null_p95,
        "cka_linear_p": lin.p, "cka_linear_ceiling": lin.ceiling,
        "cka_debiased": deb.value, "cka_debiased_null_p95": deb.null_p95,
        "cka_debiased_p": deb.p, "cka_debiased_ceiling": deb.ceiling,
    }


def gap_test(r: float, ceiling: float | None, sd: float | None
             ) -> tuple[float | None, float | None]:
    """(z, one-sided p) of "r is below its ceiling": z = (r − ceiling) / sd, p = Φ(z), as the
    recipe comparison's noise marks test it (the ceilings run low under heavy noise, which only
    makes a small p rarer). With no sampling noise (both recipes question-invariant, sd 0) any
    shortfall is a difference: p 0 (z None), else 1. (None, None) where the ceiling or the
    sampling error is unknown."""
    if ceiling is None or sd is None:
        return None, None
    gap = r - ceiling
    if sd == 0:
        return None, 0.0 if gap < -1e-9 else 1.0
    z = gap / sd
    return float(z), float(stats.norm.cdf(z))


def _spread(qa: QuestionPass | None, qb: QuestionPass | None, la: int, lb: int) -> float | None:
    """Spearman across questions of the per-question persona spread, model A against model B
    (descriptive: is a question that separates the personas in one model one that separates
    them in the other); None where a recipe is question-invariant or has no per-question
    vectors, or where fewer than 3 questions have a spread in both."""
    if qa is None or qb is None:
        return None
    sx, sy = qa.spreads[la], qb.spreads[lb]
    ok = ~(np.isnan(sx) | np.isnan(sy))
    if ok.sum() < 3 or np.std(sx[ok]) == 0 or np.std(sy[ok]) == 0:
        return None
    return float(stats.spearmanr(sx[ok], sy[ok])[0])


def _call(c: dict[str, Any], alpha: float) -> CrossCell:
    """The cell's call. *differ*: the mean-centred r is below its ceiling by more than its
    sampling error (one-sided, Holm over every cell at ``alpha``), so identical geometry sampled
    as noisily would not give it. *agree*: the geometry is beyond the Mantel null after Holm over every
    cell and the r is within sampling error of its ceiling. *cannot tell*: neither."""
    proc_reason = c.pop("procrustes_reason")
    beyond = c["mc_r_p_holm"] is not None and c["mc_r_p_holm"] < alpha
    c["below_ceiling"] = c["mc_r_gap_p_holm"] is not None and c["mc_r_gap_p_holm"] < alpha
    if c["mc_r"] is None:
        call, reason = "cannot tell", "a store's persona geometry is constant, every persona alike"
    elif c["below_ceiling"]:
        call = "differ"
        reason = ("below what identical geometry reaches, beyond sampling error"
                  + (", though more alike than shuffled personas" if beyond else
                     ", and not more alike than shuffled personas"))
    elif beyond and c["mc_r_gap_p"] is not None:
        call, reason = "agree", ("more alike than shuffled personas and within sampling error "
                                 "of what identical geometry reaches")
    elif beyond:
        call, reason = "cannot tell", ("more alike than shuffled personas, but a store has no "
                                       "per-question vectors, so no ceiling to hold it to")
    elif c["mc_r_gap_p"] is None:
        call, reason = "cannot tell", ("not beyond shuffled personas, and a store has no "
                                       "per-question vectors, so no ceiling to hold it to")
    else:
        call, reason = "cannot tell", ("neither beyond shuffled personas nor below what identical "
                                       "geometry reaches: too noisy or too few personas to tell")
    if proc_reason:
        reason += f"; Procrustes: {proc_reason}"
    return CrossCell(call=call, reason=reason, **c)


# --- sentences ----------------------------------------------------------------------------------

def _f(v: float | None, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _p(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}" if v >= 1e-4 else f"{v:.1e}"


def _span(values: list[float | None], nd: int = 2) -> str:
    """``0.97`` or ``0.95–0.98`` (the range over layer pairs); n/a where none is known."""
    got = [v for v in values if v is not None]
    if not got:
        return "n/a"
    lo, hi = _f(min(got), nd), _f(max(got), nd)
    return lo if lo == hi else f"{lo}–{hi}"


def _group_numbers(call: str, cells: list[CrossCell]) -> str:
    """One call's layer pairs and their numbers as ranges: ``L1~L1, L2~L2: mc r 0.97–0.98
    (ceiling 0.97–0.98), Mantel Holm p ≤ 0.0060; held-out Procrustes 0.95 (null p95 ≤ 0.12,
    ceiling 0.95)``."""
    where = ", ".join(c.layers for c in cells)
    known = [c for c in cells if c.mc_r is not None]
    if not known:
        return f"{where}: constant geometry"
    text = f"{where}: mc r {_span([c.mc_r for c in known])}"
    zs = [c.mc_r_gap_z for c in known if c.mc_r_gap_z is not None]
    if call == "differ":
        text += (f", below its ceiling {_span([c.mc_r_ceiling for c in known])}"
                 + (f" by {_span([-z for z in zs], 1)} SD" if zs else " (no sampling noise)"))
    else:
        text += f" (ceiling {_span([c.mc_r_ceiling for c in known])})"
    ps = [c.mc_r_p_holm for c in known if c.mc_r_p_holm is not None]
    text += (f", Mantel Holm p ≤ {_p(max(ps))}" if call == "agree" and ps else
             f", Mantel Holm p {_p(min(ps))}" + (f"–{_p(max(ps))}" if max(ps) > min(ps) else "")
             if ps else "")
    proc = [c for c in known if c.procrustes_cos is not None]
    if proc:
        p95 = [c.procrustes_null_p95 for c in proc if c.procrustes_null_p95 is not None]
        text += (f"; held-out Procrustes {_span([c.procrustes_cos for c in proc])} (null p95 "
                 f"≤ {_f(max(p95)) if p95 else 'n/a'}, ceiling "
                 f"{_span([c.procrustes_ceiling for c in proc])})")
    return text


def recipe_answer(recipe: str, cells: list[CrossCell]) -> RecipeAnswer:
    """``last`` — agree (why): L7~L7, L15~L15: mc r 0.95–0.97 (ceiling 0.96), …; a recipe
    whose layer pairs get different calls is *mixed*, its layer pairs grouped by call."""
    groups: dict[str, list[CrossCell]] = {}
    for c in cells:
        groups.setdefault(c.call, []).append(c)
    if len(groups) == 1:
        (call,) = groups
        why = f" ({cells[0].reason})" if len({c.reason for c in cells}) == 1 else ""
        return RecipeAnswer(recipe, call,
                            f"`{recipe}` — {call}{why}: {_group_numbers(call, cells)}.")
    body = " | ".join(f"{k} at {_group_numbers(k, groups[k])}" for k in CALLS if k in groups)
    return RecipeAnswer(recipe, "mixed", f"`{recipe}` — mixed: {body}.")


def headline(answers: list[RecipeAnswer], sa: StoreSide, sb: StoreSide) -> str:
    counts = {k: sum(a.call == k for a in answers) for k in (*CALLS, "mixed")}
    said = ", ".join(f"{k} for {v}" for k, v in counts.items() if v)
    return (f"Is each recipe's persona geometry the same in {sa.name} (A) and {sb.name} (B)? "
            f"{said} of {len(answers)} recipe(s) (mean-centred matrix r against its Mantel null, "
            "Holm over every cell, and its split-half ceiling).")


def _notes(cells: list[CrossCell], recipes: list[str], sa: StoreSide, sb: StoreSide, n: int,
           n_perm: int, min_holm: float, procrustes_corrected: bool,
           cfg: CrossModelConfig) -> list[str]:
    notes = [LEFT_OUT]
    if sa.manifest_hash == sb.manifest_hash:
        notes.append("A and B are the same store (the same manifest hash): every recipe should "
                     "agree with itself.")
    elif sa.model_identity is not None and sa.model_identity == sb.model_identity:
        notes.append(f"Both stores were made with the same model ({sa.model_identity}): what "
                     "differs is how they were extracted"
                     + (f" (dtype {sa.dtype} and {sb.dtype})" if sa.dtype != sb.dtype else "")
                     + ".")
    if sa.d_model != sb.d_model:
        notes.append(f"The models' widths differ (d_model {sa.d_model} and {sb.d_model}): the "
                     "held-out rotation is fitted between each model's own principal "
                     "coordinates of the fit personas, in the smaller of the two ranks.")
    if any(r in RESPONSE_RECIPES for r in recipes):
        notes.append("Response recipes read each model's own generated responses, so they "
                     "compare the models' answers as well as their representations.")
    k = sum(c.mc_r_p_holm is not None and c.mc_r_p_holm < cfg.alpha for c in cells)
    notes.append(f"{k} of {len(cells)} cells have mean-centred persona geometries more alike "
                 f"than shuffled personas give (Mantel, {n_perm} permutations, Holm over every "
                 f"cell at {cfg.alpha:g}; the smallest reachable Holm p is {min_holm:.4f}).")
    if min_holm >= cfg.alpha:
        notes.append(f"No cell can be called beyond chance here: with {n} personas and "
                     f"{n_perm} permutations Holm over {len(cells)} cells cannot go below "
                     f"{min_holm:.3f}" + (f"; raise the permutations to at least "
                                          f"{math.ceil(2 * len(cells) / cfg.alpha)}"
                                          if math.factorial(n) > n_perm + 1 else "") + ".")
    if not procrustes_corrected and any(c.procrustes_p is not None for c in cells):
        notes.append(f"The held-out Procrustes cosine is an effect size beside its ceiling and "
                     f"its {cfg.n_null}-draw null (z, p95), not a corrected test: Holm over "
                     f"{len(cells)} cells would need at least {math.ceil(len(cells) / cfg.alpha)} "
                     "draws (`null_draws`).")
    notes.append(f"'differ' needs the mean-centred r below its split-half ceiling by more than "
                 f"its sampling error (one-sided, Holm over every cell at {cfg.alpha:g}); "
                 "'agree' needs it beyond the Mantel null after Holm and not below its ceiling.")
    if n < 8:
        notes.append(f"With {n} personas the nulls are wide; read the statistics as "
                     "descriptive.")
    return notes
