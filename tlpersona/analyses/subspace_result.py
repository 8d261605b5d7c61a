"""What the shared-subspace analysis found (:func:`tlpersona.analyses.subspace.subspace`), as
typed members; ``to_dict()`` is subspace.json, key for key and in its order, and ``load``
reads one back."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

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
        from tlpersona.analyses.subspace import ALPHA

        return self.p_holm < ALPHA

    def __str__(self) -> str:
        from tlpersona.analyses.subspace import found_text

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
        from tlpersona.analyses.subspace import answer

        return answer(self)

    def attached(self, source: ActivationSource | None) -> SubspaceResult:
        """This result with the store it was computed on: its personas' PC1–PC2 scores read
        from it (where the components are known)."""
        if source is None:
            return replace(self, source=None)
        from tlpersona.analyses.subspace import pc_scores

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
        from tlpersona.infra.files import atomic_write_bytes
        from tlpersona.report.html import write_html
        from tlpersona.report.subspace import write_subspace

        if self.source is None and not self.scores:
            need_source(None, "save (its figures)")
        if not self.components:
            raise TlpersonaError("save needs the shared PCs: this result was loaded without "
                                 "its pcs.safetensors")
        with results_set(out, "subspace", overwrite, finish=write_html) as stage:
            section = write_subspace(self, stage)
            atomic_write_bytes(stage / "subspace.md", section.encode())
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
