"""Typed results of the API calls: the numbers a notebook reads as attributes, ``.to_dict()``
(exactly the JSON the CLI writes), ``.save(out_dir)`` (JSON, report, figures) and
``Result.load(path)`` (a saved result back, from its JSON file or the directory holding it)."""

from __future__ import annotations

import copy
import json
import math
import threading
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import numpy as np

from tlpersona.analyses.projection import Combined, Nearest
from tlpersona.data import Inputs
from tlpersona.errors import TlpersonaError
from tlpersona.files import atomic_write_bytes, replaced_dir
from tlpersona.interventions.patching import PatchResult as _PatchResult
from tlpersona.interventions.steering import SteeringResult as _SteeringResult
from tlpersona.locks import LOCK_NAME, exclusive
from tlpersona.positions import canonical
from tlpersona.safety import RESULTS_MARK, check_results_dir, mark_results, read_text, strict_json
from tlpersona.sources import ActivationSource, open_source, stored_layer
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


# --- reading saved results back --------------------------------------------------------------

#: result kind -> (its file's name, the class that loads it, top-level keys only that kind has)
_KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "compare": ("results.json", "CompareResult", ("cells", "overall")),
    "subspace": ("subspace.json", "SubspaceResult", ("layers", "null", "unit_norm")),
    "projection": ("projection.json", "ProjectionResult", ("stored", "items", "axis")),
    "patch": ("patch.json", "PatchResult", ("patching",)),
    "steering": ("steering.json", "SteeringResult", ("scores", "verdicts", "typical_norm")),
}

T = TypeVar("T")


def _kind_of(data: dict[str, Any]) -> str | None:
    return next((k for k, (_, _, keys) in _KINDS.items() if all(x in data for x in keys)), None)


def _read_result(path: str | Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """The file of a saved ``kind`` result (``path`` itself, or its file in the directory
    ``path``) and its JSON object; anything else is one line naming the file."""
    name, cls, _ = _KINDS[kind]
    path = Path(path)
    file = path / name if path.is_dir() else path
    if path.is_dir() and not file.exists():
        raise TlpersonaError(f"{path}: no {name} in this directory (not a saved {kind} result)")
    text = read_text(file, f"{kind} result ({name})")
    try:
        data = strict_json(text)
    except ValueError as exc:
        raise TlpersonaError(f"{file}: invalid JSON ({exc})") from None
    found = _kind_of(data) if isinstance(data, dict) else None
    if found != kind:
        what = f"a {found} result" if found else "not a tlpersona result"
        hint = f" (load it with {_KINDS[found][1]}.load)" if found else ""
        raise TlpersonaError(f"{file} is {what}, not a {kind} result for {cls}.load{hint}")
    assert isinstance(data, dict)
    return file, data


def _source_for(source: ActivationSource | str | Path | None, data: dict[str, Any],
                file: Path) -> ActivationSource | None:
    """``source`` opened, if given, and checked to be the store ``data`` was computed on."""
    if source is None:
        return None
    src = open_source(source)
    want = data.get("input", {}).get("manifest_hash")
    if src.manifest_hash != want:
        raise TlpersonaError(f"`source` (manifest {src.manifest_hash[:12]}) is not the store "
                             f"{file} was computed on (manifest {str(want)[:12]})")
    return src


def _need_source(source: ActivationSource | None, what: str) -> ActivationSource:
    if source is None:
        raise TlpersonaError(f"{what} reads the store this result was computed on; this one was "
                             "loaded without it: load it again with `source`")
    return source


@dataclass(frozen=True)
class _Reader:
    """Typed values from a result file's JSON, as its dataclasses hold them (tuples, integer
    keys, nested results), with one line naming the file and field of anything it cannot hold.
    A field this code does not know is refused (it would be dropped, so the loaded result
    would not be the saved one), naming the version that wrote the file. The writers save NaN
    as null: a float field reads null back as NaN, a field that may be None as None."""

    file: Path
    written_by: object  # the file's code_version

    def fail(self, at: str, problem: str) -> NoReturn:
        raise TlpersonaError(f"{self.file}: field {at!r} {problem}")

    def unknown(self, at: str) -> NoReturn:
        by = self.written_by
        self.fail(at, f"is unknown to tlpersona {__version__}"
                  + (f" (the file was written by tlpersona {by}: load it with that version)"
                     if by is not None and by != __version__ else ""))

    def build(self, tp: Any, value: Any, at: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (types.UnionType, typing.Union):
            if value is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self.build(inner, value, at)
        if is_dataclass(tp):
            return self.dataclass(tp, value, at)  # type: ignore[arg-type]
        if origin is list:
            return [self.build(args[0], v, f"{at}[{i}]") for i, v in enumerate(self.array(value, at))]
        if origin is tuple:
            items = self.array(value, at)
            kinds = [args[0]] * len(items) if args[1:] == (...,) else list(args)
            if len(kinds) != len(items):
                self.fail(at, f"has {len(items)} entries, not {len(kinds)}")
            pairs = enumerate(zip(kinds, items, strict=True))
            return tuple(self.build(t, v, f"{at}[{i}]") for i, (t, v) in pairs)
        if origin is dict:
            if not isinstance(value, dict):
                self.fail(at, "is not an object")
            return {self.key(args[0], k, at): self.build(args[1], v, f"{at}[{k!r}]")
                    for k, v in value.items()}
        if origin is Literal:
            if value not in args:
                self.fail(at, f"is {value!r}, not one of {', '.join(map(repr, args))}")
            return value
        return self.leaf(tp, value, at)

    def array(self, value: Any, at: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(at, "is not a list")
        return value

    def key(self, tp: Any, key: str, at: str) -> Any:
        # JSON keys are strings: integer keys (layers) were written as their digits
        if tp is int:
            try:
                return int(key)
            except ValueError:
                self.fail(at, f"has key {key!r}, not an integer")
        return key

    def leaf(self, tp: Any, value: Any, at: str) -> Any:
        if tp is Any:
            return value
        if tp is float:
            if value is None:  # the writers store NaN and infinities as null
                return math.nan
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            self.fail(at, f"is {value!r}, not a number")
        if tp in (bool, str) and isinstance(value, tp):
            return value
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        self.fail(at, f"is {value!r}, not {getattr(tp, '__name__', tp)}")

    def dataclass(self, tp: type[T], value: Any, at: str) -> T:
        """``tp`` from the object ``value``; a missing field with a default takes it."""
        if not isinstance(value, dict):
            self.fail(at, "is not an object")
        hints = typing.get_type_hints(tp)
        known = {f.name: f for f in fields(tp) if f.init}  # type: ignore[arg-type]
        extra = [k for k in value if k not in known]
        if extra:
            self.unknown(f"{at}.{extra[0]}" if at else extra[0])
        kwargs = {}
        for name, f in known.items():
            where = f"{at}.{name}" if at else name
            if name in value:
                kwargs[name] = self.build(hints[name], value[name], where)
            elif f.default is MISSING and f.default_factory is MISSING:
                self.fail(where, "is missing")  # a field with a default: a file of an older version
        return tp(**kwargs)


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
    # for comparability with other tools, not part of the verdict; None for results without it
    cka_linear: float | None = None  # linear CKA of the mean-centred centroids
    cka_linear_null_p95: float | None = None
    cka_linear_p: float | None = None
    cka_linear_ceiling: float | None = None  # half size: below what identical recipes reach
    cka_debiased: float | None = None  # debiased CKA (unbiased HSIC)
    cka_debiased_null_p95: float | None = None
    cka_debiased_p: float | None = None
    cka_debiased_ceiling: float | None = None  # full size

    @classmethod
    def of(cls, c: dict[str, Any]) -> PairCell:
        s, mcc, raw, mc = (c["per_persona_cos"], c["per_persona_cos_mc"], c["matrix_raw"],
                           c["matrix_mc"])
        proc, ceil = c["procrustes_cos"], c["ceiling"]
        lin, deb = (c.get("cka", {}).get(k, {}) for k in ("linear", "debiased"))
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
            procrustes_ceiling=proc.get("ceiling"), spread_spearman=c["spread"]["spearman"],
            cka_linear=lin.get("value"), cka_linear_null_p95=lin.get("null_p95"),
            cka_linear_p=lin.get("p"), cka_linear_ceiling=lin.get("ceiling"),
            cka_debiased=deb.get("value"), cka_debiased_null_p95=deb.get("null_p95"),
            cka_debiased_p=deb.get("p"), cka_debiased_ceiling=deb.get("ceiling"))

    def __repr__(self) -> str:
        # a notebook shows this line, not 37 fields
        return (f"PairCell(L{self.layer} {self.x} ~ {self.y}: {self.verdict}, cos_mean "
                f"{_num(self.cos_mean)}, mc_r {_num(self.mc_r)} (Holm p {_num(self.mc_r_p_holm)})"
                + (f"; failed: {self.failed}" if self.failed else "") + ")")


@dataclass(frozen=True)
class CompareResult:
    """What :func:`tlpersona.compare` found; ``.to_dict()`` is results.json. ``source``: the
    store it read (None for a result loaded without it)."""

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
    source: ActivationSource | None = field(repr=False)
    _data: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, data: dict[str, Any], source: ActivationSource | None) -> CompareResult:
        ov = data["overall"]
        return cls(list(data["layers"]), list(data["positions"]), list(data["personas"]),
                   [PairCell.of(c) for c in data["cells"]], bool(ov["recipe_robust"]),
                   ov["sentence"], [list(g) for g in ov["partition"]], ov["answer"],
                   list(ov["notes"]), int(data["n_permutations"]),
                   float(data["min_attainable_p_holm"]), source, data)

    @classmethod
    def load(cls, path: str | Path, source: ActivationSource | str | Path | None = None
             ) -> CompareResult:
        """A saved comparison: ``path`` is its results.json or the directory holding it.
        ``.to_dict()`` is the file as saved (keys this version does not read are kept).
        ``source``, the store it was computed on (checked by its manifest hash), is needed
        only for negative layers in :meth:`cell` and for :meth:`save` (its figures)."""
        file, data = _read_result(path, "compare")
        src = _source_for(source, data, file)
        try:
            return cls.of(data, src)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise TlpersonaError(f"{file}: not a complete compare result (field {exc} missing "
                                 "or malformed)") from None

    def cell(self, layer: int, x: str, y: str) -> PairCell:
        """The cell of recipes ``x`` and ``y`` (names or aliases: ``c2`` is ``sys_end``) at
        ``layer`` (negative: counted from the end of the model)."""
        la = stored_layer(_need_source(self.source, "a negative `layer`"), layer) if layer < 0 \
            else layer
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

        source = _need_source(self.source, "save (its cosine-matrix figure)")
        with results_set(out, "compare", overwrite) as stage:
            write_csv(self.cells, stage / "cells.csv")
            report = write_report(self._data, source, stage, title)
        return Path(out) / report.relative_to(stage)


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

    @classmethod
    def of(cls, d: dict[str, Any]) -> KFound:
        return cls(d["k_found"], bool(d["k_found_saturated"]), list(d["k_found_null"]),
                   d["k_found_null_p"], d.get("k_found_null_p_holm"), d["k_found_p"],
                   d["k_found_p_holm"])

    @property
    def beyond_null(self) -> bool:
        """Whether the layer is called: PC1 shared by every recipe pair beyond chance, Holm over
        the layers (at 0.05)."""
        from tlpersona.analyses.subspace import ALPHA

        return self.p_holm < ALPHA

    def __str__(self) -> str:
        from tlpersona.analyses.subspace import found_text

        return found_text({"k_found": self.k, "k_found_saturated": self.saturated,
                           "k_found_p_holm": self.p_holm})


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
    """What :func:`tlpersona.subspace` found; ``.to_dict()`` is subspace.json. ``source``: the
    store it read (None for a result loaded without it)."""

    positions: list[str]
    unit_norm: bool
    layers: list[SubspaceLayer]
    answer: str  # the report's line on the shared subspace (one sentence, with numbers)
    components: dict[int, np.ndarray] = field(repr=False)  # layer -> [k, d_model] shared PCs
    source: ActivationSource | None = field(repr=False)
    _data: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, data: dict[str, Any], components: dict[int, np.ndarray],
           source: ActivationSource | None) -> SubspaceResult:
        layers = [SubspaceLayer(d["layer"], KFound.of(d), list(d["explained_variance_ratio"]),
                                KFound.of(d["aligned"]) if "aligned" in d else None)
                  for d in data["layers"]]
        from tlpersona.analyses.subspace import answer

        return cls(list(data["positions"]), bool(data["unit_norm"]), layers, answer(data),
                   components, source, data)

    @classmethod
    def load(cls, path: str | Path, source: ActivationSource | str | Path | None = None
             ) -> SubspaceResult:
        """A saved subspace result: ``path`` is its subspace.json or the directory holding it;
        ``components`` are read from pcs.safetensors beside it (saved as float32, so equal to
        the computed ones to float32 precision; empty where the file is absent).
        ``.to_dict()`` is the JSON as saved (keys this version does not read are kept).
        ``source``, the store it was computed on (checked by its manifest hash), is needed
        only for :meth:`save` (its figures)."""
        file, data = _read_result(path, "subspace")
        src = _source_for(source, data, file)
        try:
            layers = [int(la["layer"]) for la in data["layers"]]
            comps = _read_components(file.parent / "pcs.safetensors", layers)
            return cls.of(data, comps, src)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise TlpersonaError(f"{file}: not a complete subspace result (field {exc} "
                                 "missing or malformed)") from None

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

        source = _need_source(self.source, "save (its figures)")
        if not self.components:
            raise TlpersonaError("save needs the shared PCs: this result was loaded without "
                                 "its pcs.safetensors")
        with results_set(out, "subspace", overwrite) as stage:
            section = write_subspace(self._data, self.components, source, stage)
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
    code_version: str = field(default=__version__, repr=False)  # the version that computed it

    @classmethod
    def load(cls, path: str | Path) -> ProjectionResult:
        """A saved projection: ``path`` is its projection.json or the directory holding it."""
        file, data = _read_result(path, "projection")
        f = _Reader(file, data.get("code_version")).dataclass(_ProjectionFile, data, "")
        points = [Projected(s.persona, recipe, s.coords, True)
                  for recipe, rows in f.stored.items() for s in rows]
        points += [Projected(i.label, i.recipe, i.coords, False,
                             Nearest([(n.persona, n.cos) for n in i.nearest], i.nearest_rank,
                                     i.nearest_pool, i.nearest_p_holm, i.nearest_tests,
                                     i.nearest_exact), i.text, i.questions) for i in f.items]
        # the coordinate names, in the frame's order (every point has them all)
        axes = list(points[0].coords) if points else []
        return cls(f.store, f.layer, f.axis, f.positions, axes, points, f.inputs,
                   [Combined(c.label, c.recipes, c.rank, c.pool, c.p_holm, c.tests, c.exact)
                    for c in f.combined], f.code_version)

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
                "code_version": self.code_version}

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


@dataclass(frozen=True)
class _StoredRow:
    persona: str
    coords: dict[str, float]


@dataclass(frozen=True)
class _NearRow:
    persona: str
    cos: float


@dataclass(frozen=True)
class _ItemRow:
    label: str
    recipe: str
    text: str
    questions: list[str]
    coords: dict[str, float]
    nearest: list[_NearRow]
    nearest_rank: int
    nearest_pool: int
    nearest_p: float  # rank / pool, recomputed by Nearest
    nearest_p_holm: float | None
    nearest_tests: int
    nearest_exact: bool


@dataclass(frozen=True)
class _CombinedRow:
    label: str
    recipes: list[str]
    rank: int
    pool: int
    p: float  # rank / pool, recomputed by Combined
    p_holm: float | None
    tests: int
    exact: bool


@dataclass(frozen=True)
class _ProjectionFile:
    """projection.json as :meth:`ProjectionResult.to_dict` writes it."""

    store: str
    inputs: Inputs
    layer: int
    axis: str
    positions: list[str]
    stored: dict[str, list[_StoredRow]]
    items: list[_ItemRow]
    combined: list[_CombinedRow]
    code_version: str


@dataclass
class PatchResult(_PatchResult):
    """What :func:`tlpersona.patch` measured (see
    :class:`tlpersona.interventions.patching.PatchResult` for the fields); ``.to_dict()`` is what
    patch.json holds under ``"patching"``."""

    @classmethod
    def of(cls, result: _PatchResult) -> PatchResult:
        return cls(**{f.name: getattr(result, f.name) for f in fields(result)})

    @classmethod
    def load(cls, path: str | Path) -> PatchResult:
        """A saved patching result: ``path`` is its patch.json or the directory holding it
        (``.to_dict()`` is the file's ``"patching"``)."""
        file, data = _read_result(path, "patch")
        reader = _Reader(file, data.get("code_version"))
        extra = [k for k in data if k not in ("patching", "code_version")]
        if extra:
            reader.unknown(extra[0])
        return reader.dataclass(cls, data["patching"], "patching")

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
    :class:`tlpersona.interventions.steering.SteeringResult` for the fields); ``.to_dict()`` is
    steering.json."""

    code_version: str = field(default=__version__, repr=False)  # the version that computed it

    @classmethod
    def of(cls, result: _SteeringResult) -> SteeringResult:
        return cls(**{f.name: getattr(result, f.name) for f in fields(result)})

    @classmethod
    def load(cls, path: str | Path) -> SteeringResult:
        """A saved steering result: ``path`` is its steering.json or the directory holding it."""
        file, data = _read_result(path, "steering")
        return _Reader(file, data.get("code_version")).dataclass(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "code_version": self.code_version}

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
