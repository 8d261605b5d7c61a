"""Checks beside the comparison's cells: how much of each recipe's persona variance is the
attention sink (:func:`sink_diagnostic`), and which personas' per-question rows a recipe left
out (:func:`missing_rows`). The B* check is :func:`tlpersona.analyses.controls.bstar_check`.
"""

from __future__ import annotations

import numpy as np

from tlpersona.analyses import metrics as M
from tlpersona.analyses.compare.result import RecipeSink, RecipeSinkLength, SinkCheck, SinkLayer
from tlpersona.cache.source import ActivationSource

#: Share of a recipe's persona variance along the first-token direction above which the report
#: warns that the recipe mostly measures the attention sink (and so prompt length).
SINK_WARN = 0.5


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
