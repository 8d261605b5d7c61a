"""What the shared-subspace analysis found (:func:`tlpersona.analyses.subspace.subspace`), as
typed members; ``to_dict()`` is subspace.json, key for key and in its order, and ``load``
reads one back."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tlpersona.analyses.kfound import ALPHA, POWER_NOTE, pc_level, pc_scores, pc_statistic
from tlpersona.cache.source import ActivationSource, need_source, source_for
from tlpersona.errors import TlpersonaError
from tlpersona.infra.resultjson import NOT_JSON, JsonView, Reader, clip, key
from tlpersona.infra.resultsets import read_result, results_set


@dataclass(frozen=True)
class KFound:
    """A held-out shared dimension: how many leading shared PCs every recipe pair orders
    held-out personas alike on beyond chance, by the per-PC intersection–union test (label
    permutations of the held-out personas, :mod:`tlpersona.analyses.subspace`). The test calls
    the layer (k ≥ 1); the count beyond 1 is descriptive; ``null*`` are descriptive
    relabelled draws."""

    k: int | None
    saturated: bool  # every countable PC passed: the subspace may be larger
    null: list[int | None]  # the same count after relabelling one recipe's personas
    null_p: float | None  # (1 + draws reaching k) / (draws + 1); None when k is None
    null_p_holm: float | None  # null_p Holm-adjusted over the layers
    p: float | None  # PC1's intersection–union p; None when k is None
    p_holm: float  # that p (1 where nothing was found), Holm-adjusted over every layer

    @property
    def beyond_null(self) -> bool:
        """Whether the layer is called: PC1 shared by every recipe pair beyond chance, Holm over
        the layers (at 0.05)."""
        return self.p_holm < ALPHA

    def __str__(self) -> str:
        return found_text(self)


@dataclass(frozen=True)
class PCAgreement:
    """One shared PC: per recipe pair (``"x~y"``), the Pearson r across personas of the two
    recipes' scores on it (NaN where it is undefined)."""

    pc: int
    pairs: dict[str, float]


@dataclass(frozen=True)
class CurvePair:
    """One pair projected onto the top-K shared PCs: per-persona cosine (mean, min) and
    cosine-matrix Pearson r (NaN with too few personas)."""

    cos_mean: float
    cos_min: float
    mc_r: float


@dataclass(frozen=True)
class CurveRow:
    k: int
    pairs: dict[str, CurvePair]


@dataclass(frozen=True)
class HeldOutSplit:
    """The persona split: fitted on ``n_fit``, scored on the other ``n_scored``."""

    n_fit: int
    n_scored: int


@dataclass(frozen=True)
class RecipeVariance:
    """One recipe's between-persona variance captured by the top K shared PCs and by its own
    top K PCs (cumulative, K = 1 …), and the largest principal angle between the two K-spaces
    (degrees)."""

    shared_cumulative: list[float]
    own_cumulative: list[float]
    max_principal_angle_deg: list[float]


@dataclass(frozen=True)
class AlignedLayer:
    """The Procrustes-aligned shared subspace at one layer (:mod:`tlpersona.analyses.aligned`).

    ``per_pc``: per shared PC, per recipe pair, Pearson r across the scored personas of the two
    recipes' aligned scores (as the plain ``per_pc``). ``reference``: the recipe whose frame the
    alignment starts from; ``rank``: the number of shared PCs counted (the dimension of the
    common frame, at most n_fit − 1). ``k_found_p``: the layer's call, PC1's
    intersection–union p (None when nothing is found), Holm-adjusted over the layers into
    ``k_found_p_holm``. ``k_found_null_p`` = (1 + #relabellings reaching the count) / (N + 1),
    descriptive, None when nothing is found or no draw was run.
    """

    reference: str
    rank: int
    k: int | None = field(metadata=key("k_found"))
    k_found_saturated: bool
    k_found_in_sample: int | None
    k_found_p: float | None
    k_found_null: list[int | None]
    k_found_null_p: float | None
    per_pc_p_iut: list[float]
    per_pc_pair_p: list[dict[str, float]]
    per_pc_threshold: list[float | None]
    per_pc: list[PCAgreement]
    n_fit: int
    n_scored: int
    k_found_p_holm: float
    k_found_null_p_holm: float | None

    @property
    def k_found(self) -> KFound:
        return KFound(self.k, self.k_found_saturated, self.k_found_null, self.k_found_null_p,
                      self.k_found_null_p_holm, self.k_found_p, self.k_found_p_holm)

    def to_dict(self) -> dict[str, Any]:
        from tlpersona.infra.resultjson import to_json

        return to_json(self)


@dataclass(frozen=True, kw_only=True)
class SubspaceLayer:
    """The shared persona subspace at one layer: ``k_found`` (a :class:`KFound`: the recipes in
    their own residual basis, joint PCA), the per-PC tests behind it, the descriptive curves and
    variance shares, and with ``align="procrustes"`` the same count after rotating the recipes
    onto a common frame (``aligned``)."""

    layer: int
    k_max: int
    k: int | None = field(metadata=key("k_found"))
    k_found_held_out: int | None  # the same count (subspace.json names it both ways)
    # every countable PC shared: the subspace may be larger than the fit half can show
    k_found_saturated: bool
    k_found_in_sample: int | None  # every persona fitted and scored, r > min_r per PC: no test
    k_found_p: float | None
    k_found_null: list[int | None]
    k_found_null_p: float | None
    per_pc_p_iut: list[float]
    per_pc_pair_p: list[dict[str, float]]
    per_pc_threshold: list[float | None]
    k_largest_passing: int | None
    k_largest_passing_in_sample: int | None
    per_pc: list[PCAgreement]
    per_pc_in_sample: list[PCAgreement]
    held_out: HeldOutSplit
    explained_variance_ratio: list[float]
    pc1_sink_cos: float | None
    curve: list[CurveRow]
    held_out_curve: list[CurveRow]
    variance: dict[str, RecipeVariance]
    aligned_layer: AlignedLayer | None = field(default=None,
                                               metadata=key("aligned", omit_none=True))
    k_found_p_holm: float
    k_found_null_p_holm: float | None

    @property
    def k_found(self) -> KFound:
        return KFound(self.k, self.k_found_saturated, self.k_found_null, self.k_found_null_p,
                      self.k_found_null_p_holm, self.k_found_p, self.k_found_p_holm)

    @property
    def aligned(self) -> KFound | None:
        return None if self.aligned_layer is None else self.aligned_layer.k_found

    def __repr__(self) -> str:
        return f"SubspaceLayer(L{self.layer}: {self.k_found})"


@dataclass(frozen=True)
class SubspaceThresholds:
    min_cos: float
    min_r: float


@dataclass(frozen=True)
class NullDraws:
    """The descriptive relabelled draws (``n``; the ``relabelled`` recipe's personas) and the
    level each PC is tested at."""

    n: int
    requested: int
    relabelled: str
    pc_level: float


@dataclass(frozen=True)
class ManifestRef:
    manifest_hash: str


@dataclass(frozen=True)
class SubspaceResult(JsonView):
    """What :func:`tlpersona.subspace` found; ``.to_dict()`` is subspace.json (and
    ``result["layers"]`` its entry). Not in the JSON: ``components[layer]`` the shared PCs
    ``[k, d_model]``, ``scores[layer][recipe]`` each recipe's personas on PC1–PC2
    ``[persona, 2]`` (what the report draws, personas named by ``personas``), and ``source``,
    the store it read (None for a result loaded without it)."""

    positions: list[str]
    n_personas: int
    unit_norm: bool
    align: str
    thresholds: SubspaceThresholds
    null: NullDraws
    n_permutations: int
    permutations_requested: int | None
    seed: int
    inputs: ManifestRef = field(metadata=key("input"))
    layers: list[SubspaceLayer]
    code_version: str  # the version that computed it
    components: dict[int, np.ndarray] = field(
        default_factory=dict, metadata=NOT_JSON, compare=False, repr=False)
    scores: dict[int, dict[str, np.ndarray]] = field(
        default_factory=dict, metadata=NOT_JSON, compare=False, repr=False)
    personas: list[str] = field(
        default_factory=list, metadata=NOT_JSON, compare=False, repr=False)
    source: ActivationSource | None = field(
        default=None, metadata=NOT_JSON, compare=False, repr=False)

    @property
    def answer(self) -> str:
        """The report's line on the shared subspace (one sentence, with numbers)."""
        return answer(self)

    def attached(self, source: ActivationSource | None) -> SubspaceResult:
        """This result with the store it was computed on: its personas' PC1–PC2 scores read
        from it (where the components are known)."""
        if source is None:
            return replace(self, source=None)
        return replace(self, source=source, personas=list(source.personas),
                       scores=pc_scores(source, self.positions, self.components, self.unit_norm))

    @classmethod
    def load(cls, path: str | Path, source: ActivationSource | str | Path | None = None
             ) -> SubspaceResult:
        """A saved subspace result: ``path`` is its subspace.json or the directory holding it;
        ``components`` are read from pcs.safetensors beside it (saved as float32, so equal to
        the computed ones to float32 precision; empty where the file is absent).
        ``source``, the store it was computed on (checked by its manifest hash), is needed
        only for :meth:`save` (its figures)."""
        file, data = read_result(path, "subspace")
        result = Reader(file, data.get("code_version")).dataclass(cls, data, "")
        src = source_for(source, result.inputs.manifest_hash, file)
        comps = _read_components(file.parent / "pcs.safetensors", [la.layer for la in result.layers])
        return replace(result, components=comps).attached(src)

    def to_frame(self) -> Any:
        """One row per layer (k found, its test, the curves' summaries; lists stay in
        ``to_dict()``) as a pandas DataFrame."""
        from tlpersona.infra.resultjson import frame

        return frame(self.layers)

    def __repr__(self) -> str:
        per_layer = "; ".join(f"L{la.layer} k_found {la.k_found.k}" for la in self.layers)
        return (f"SubspaceResult({len(self.positions)} recipes; {clip(per_layer, 100)})\n  "
                f"{clip(self.answer)}")

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """subspace.json, pcs.safetensors, figures/ and subspace.md into ``out`` (one set,
        swapped in whole; earlier results there only with ``overwrite``); returns subspace.md's
        path."""
        from tlpersona.report.html import write_html
        from tlpersona.report.subspace import write_subspace

        if self.source is None and not self.scores:
            need_source(None, "save (its figures)")
        if not self.components:
            raise TlpersonaError("save needs the shared PCs: this result was loaded without "
                                 "its pcs.safetensors")
        with results_set(out, "subspace", overwrite, finish=write_html) as stage:
            write_subspace(self, stage)
        return Path(out) / "subspace.md"


def _read_components(path: Path, layers: list[int]) -> dict[int, np.ndarray]:
    """pcs.safetensors' shared PCs per layer (float64, as computed); {} without the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.exists():
        return {}
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise TlpersonaError(f"{path}: not a readable safetensors file ({exc})") from None
    want = {f"layer_{la}" for la in layers}
    if set(tensors) != want:
        raise TlpersonaError(f"{path} holds {', '.join(sorted(tensors)) or 'nothing'}, not the "
                             f"layers of its subspace.json ({', '.join(sorted(want))})")
    return {la: tensors[f"layer_{la}"].astype(np.float64) for la in layers}


# --- the answer and the report's phrases, read from a result --------------------------------

def found_text(found: KFound) -> str:
    """A layer's k_found as the report states it: the count (``≥`` when every countable PC is
    shared), and whether the layer is called after Holm over every layer."""
    k = found.k
    if not k:
        return "none"
    text = f"≥ {k} (every countable PC shared)" if found.saturated else str(k)
    p = found.p_holm
    return f"{text}, {'beyond' if p < ALPHA else 'not beyond'} chance (Holm p = {p:.2g})"

def null_text(found: KFound | Mapping[str, Any]) -> str:
    """The relabelled draws' k_found values, compressed (``none ×93, 1 ×7``), and their p.
    ``found``: a :class:`KFound`, or a layer as subspace.json holds it."""
    null, null_p = ((found.null, found.null_p) if isinstance(found, KFound)
                    else (found["k_found_null"], found["k_found_null_p"]))
    counts: dict[str, int] = {}
    for k in null:
        key = "none" if k is None else str(k)
        counts[key] = counts.get(key, 0) + 1
    text = ", ".join(f"{key} ×{n}" for key, n in sorted(counts.items(), key=_null_order))
    if null_p is not None:
        text += f" (p = {null_p:.3f})"
    return text or "—"

def _null_order(item: tuple[str, int]) -> tuple[int, int]:
    return (0, 0) if item[0] == "none" else (1, int(item[0]))

def limits_text(n_perm: int, n_layers: int, n_scored: int) -> str:
    """What the k_found column can and cannot say with these permutations and personas."""
    level = pc_level(n_layers)
    text = (f"Each pair's p comes from {n_perm} label permutations (smallest p "
            f"{1 / (n_perm + 1):.2g}, below the per-PC level {level:.3g}).")
    # a permutation that orders the scored personas as the data do ties with it: about
    # 1 / n_scored! of the draws, whatever their number
    if math.factorial(n_scored) * level <= 1:
        text += (f" With {n_scored} held-out personas no PC can pass: a pair's p cannot fall "
                 f"below about 1/{n_scored}! = {1 / math.factorial(n_scored):.2g}; at "
                 f"{n_layers} layer(s) at least {2 * _scored_needed(level) - 1} personas are needed.")
    return text + (" k_found is a lower bound on the shared dimension: each PC is scored on the "
                   "held-out personas alone, and a shared PC that the fit half estimates mixed "
                   "with the recipes' own dimensions can fail (planted 5 shared dimensions: "
                   f"{POWER_NOTE}).")

def _scored_needed(level: float) -> int:
    """The fewest held-out personas whose orderings can put a p below ``level``."""
    n = 1
    while math.factorial(n) * level <= 1:
        n += 1
    return n

def _layer_k(lay: SubspaceLayer) -> str:
    return f"L{lay.layer} {'≥' if lay.k_found_saturated else ''}{lay.k}"

def answer(result: SubspaceResult | Mapping[str, Any]) -> str:
    """One sentence (≤ 220 characters) on a subspace result (or subspace.json as a mapping): is
    there a shared subspace, of what dimension per layer, beyond chance; or, when none is, what
    a PC would have needed to pass and what the personas allow."""
    if not isinstance(result, SubspaceResult):
        from tlpersona.infra.resultjson import Reader

        result = Reader(None).dataclass(SubspaceResult, dict(result), "")
    layers = result.layers
    n_layers = len(layers)
    n = result.n_personas
    held = layers[0].held_out if layers else HeldOutSplit(n // 2, n - n // 2)
    who = f"{n} personas, {held.n_fit} fit"
    beyond = [lay for lay in layers if lay.k and lay.k_found_p_holm < ALPHA]
    if beyond:
        worst = max(lay.k_found_p_holm for lay in beyond)
        head = f"Shared subspace beyond chance at {len(beyond)}/{n_layers} layers"
        # the test calls the layer (PC1 shared by every pair); k itself is descriptive
        tail = f" (Holm p ≤ {worst:.2g}; {who}; the count is descriptive beyond 1)."
        full = f"{head}: {', '.join(_layer_k(lay) for lay in beyond)}{tail}"
        ks = [lay.k for lay in beyond if lay.k]
        short = (f"{head}, k = {min(ks)}–{max(ks)}"
                 f"{' (some ≥: saturated)' if any(lay.k_found_saturated for lay in beyond) else ''}"
                 f"{tail}")
        return _fit(full, short)
    # nothing found: how far PC1 was from passing, and what the personas allow at most
    best = None
    for lay in layers:
        if lay.per_pc and lay.per_pc_threshold:
            got = float(_pc1_statistic(lay.per_pc[0]))
            bar = lay.per_pc_threshold[0]
            if best is None or (bar is not None and got - bar > best[1] - best[2]):
                best = (lay.layer, got, bar if bar is not None else float("-inf"))
    cap = f"at most {held.n_fit - 1} PC(s) can be counted, each on {held.n_scored} held-out"
    if best is None or not np.isfinite(best[1]) or not np.isfinite(best[2]):
        return _fit(f"No shared subspace at {n_layers} layer(s): with {who}, {cap} personas; "
                    "more personas would be needed to see one.",
                    f"No shared subspace at {n_layers} layer(s) ({who}): more personas needed.")
    layer, got, bar = best
    return _fit(f"No shared subspace beyond chance at {n_layers} layer(s): PC1's agreement "
                f"reached r {got:.2f} at best (L{layer}) against {bar:.2f} needed; with {who}, "
                f"{cap} personas.",
                f"No shared subspace beyond chance at {n_layers} layer(s): PC1 reached r "
                f"{got:.2f} at best (L{layer}), {bar:.2f} needed ({who}).")

def _pc1_statistic(row: PCAgreement) -> float:
    """:func:`pc_statistic` of one typed row."""
    return float(pc_statistic([{"pairs": row.pairs}])[0])

def _fit(text: str, shorter: str, limit: int = 220) -> str:
    """``text`` if it fits in ``limit`` characters, else ``shorter`` (cut if it too does not)."""
    if len(text) <= limit:
        return text
    return shorter if len(shorter) <= limit else shorter[: limit - 1] + "…"

def pc_rows(rows: list[dict[str, Any]]) -> list[PCAgreement]:
    """Per-PC agreement rows (:func:`agreement_from_scores`) as typed rows."""
    return [PCAgreement(row["pc"], row["pairs"]) for row in rows]
