"""One recipe's persona geometry across two models: two stores of the same personas and
questions (see :mod:`tlpersona.analyses.cross_model` and docs/methods/cross_model.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from tlpersona.analyses.cross_model import CrossModelConfig
from tlpersona.analyses.cross_model import CrossModelResult as _CrossModelResult
from tlpersona.analyses.cross_model import compare_models as _compare_models
from tlpersona.cache.source import ActivationSource, open_source
from tlpersona.chat.positions import parse_positions
from tlpersona.errors import TlpersonaError
from tlpersona.infra.checks import check_count
from tlpersona.infra.paths import check_results_dir
from tlpersona.infra.reading import read_text, strict_json
from tlpersona.infra.resultjson import Reader as _Reader
from tlpersona.infra.resultsets import results_set

#: The result's file in a saved set.
RESULT_FILE = "cross_model.json"


@dataclass(frozen=True)
class CrossModelResult(_CrossModelResult):
    """What :func:`tlpersona.compare_models` found (fields: see
    :class:`tlpersona.analyses.cross_model.CrossModelResult`); ``.to_dict()`` is
    cross_model.json."""

    @classmethod
    def of(cls, result: _CrossModelResult) -> CrossModelResult:
        return cls(**{f.name: getattr(result, f.name) for f in fields(result)})

    def __repr__(self) -> str:
        counts = {k: sum(c.call == k for c in self.cells) for k in ("agree", "differ", "cannot tell")}
        return (f"CrossModelResult({self.a.name} vs {self.b.name}: {len(self.recipes)} recipes × "
                f"{len(self.layer_pairs)} layer pairs, {len(self.personas)} personas; "
                + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")\n  " + self.answer)

    @classmethod
    def load(cls, path: str | Path) -> CrossModelResult:
        """A saved cross-model comparison: ``path`` is its cross_model.json or the directory
        holding it; equal to the saved result."""
        path = Path(path)
        file = path / RESULT_FILE if path.is_dir() else path
        if path.is_dir() and not file.exists():
            raise TlpersonaError(f"{path}: no {RESULT_FILE} in this directory (not a saved "
                                 "cross-model comparison)")
        try:
            data = strict_json(read_text(file, f"cross-model result ({RESULT_FILE})"))
        except ValueError as exc:
            raise TlpersonaError(f"{file}: invalid JSON ({exc})") from None
        if not isinstance(data, dict) or not {"a", "b", "cells", "recipe_answers"} <= set(data):
            raise TlpersonaError(f"{file} is not a cross-model comparison")
        return _Reader(file, data.get("code_version")).dataclass(cls, data, "")

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """cross_model.json, cells.csv (one row per recipe × layer pair), details.md,
        figures/cross_model.png and report.md (the answer first) into ``out`` (one set, swapped
        in whole; earlier results there only with ``overwrite``); returns report.md's path."""
        from tlpersona.report.cross_model import write_cross_model
        from tlpersona.report.html import write_html

        with results_set(out, "compare_models", overwrite, finish=write_html) as stage:
            write_cross_model(self, stage)
        return Path(out) / "report.md"


def compare_models(store_a: ActivationSource | str | Path, store_b: ActivationSource | str | Path,
                   out: str | Path | None = None, *, positions: Sequence[str] | None = None,
                   layers_a: Sequence[int] | None = None, layers_b: Sequence[int] | None = None,
                   permutations: int | None = None, seed: int = 0, splits: int = 10,
                   null_draws: int = 100, overwrite: bool = False) -> CrossModelResult:
    """Compare each recipe's persona geometry across two models: ``store_a`` and ``store_b``
    (stores, seed-layout directories or paths to them) must hold the same personas and
    questions in the same order (names and the manifests' hashes of their texts).

    For every recipe both hold (or ``positions``) at every layer pair — ``layers_a`` paired in
    order with ``layers_b`` (negative: from each model's end), by default the block numbers both
    stores hold when the models have the same depth — the mean-centred persona-geometry r with
    its Mantel null (``permutations``; None: 2 × cells / alpha, at least 1000, so Holm over
    every cell can reach alpha) and its split-half ceiling (``splits`` question halvings), the
    held-out Procrustes cosine with its relabelled null (``null_draws``) in each model's own
    principal coordinates (so the widths may differ), and CKA for comparability; each cell is
    called agree, differ or cannot tell. Per-persona cosine is not computed: the two models'
    bases do not correspond. With ``out`` the result is also saved there (see ``.save``)."""
    check_count(permutations, "`permutations`", 1)
    check_count(null_draws, "`null_draws`", 1)
    check_count(splits, "`splits`", 1)
    if out is not None:
        check_results_dir(Path(out), overwrite)  # before any computation
    a, b = open_source(store_a), open_source(store_b)
    cfg = CrossModelConfig(
        positions=None if positions is None else [p.name for p in parse_positions(list(positions))],
        layers_a=None if layers_a is None else list(layers_a),
        layers_b=None if layers_b is None else list(layers_b),
        n_perm=permutations, seed=seed, n_splits=splits, n_null=null_draws)
    result = CrossModelResult.of(_compare_models(a, b, cfg))
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result
