"""Many edited forwards of many sequences, batched: each row its own sequence and its own edits.

Rows of different lengths are right-padded without an attention mask: the model is causal, so
the padding (which comes after every real token) cannot change a real token's activations, and
with the eager attention used on the CPU a position's value does not depend on what follows it.
Rows are sorted by length so a batch carries little padding. The hook at each layer applies the
:class:`~tlpersona.runtime.edits.RowEdits` of its rows; only the positions a row reads are
put through the final norm and the unembedding.

Sequences whose first tokens agree with a shared prefix (the base persona's system block, which
steering leaves alone) start from that prefix's KV cache instead of recomputing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tlpersona.interventions.runner import Runner, hook_name
from tlpersona.models.loading import stop_forward
from tlpersona.runtime.batching import pad_batch
from tlpersona.runtime.edits import RowEdits


@dataclass(frozen=True)
class Edit:
    """One layer's edit of one row (see :mod:`tlpersona.runtime.edits`)."""

    layer: int
    start: int
    delta: torch.Tensor | None = None
    u: torch.Tensor | None = None
    lo: float = -math.inf
    hi: float = math.inf


@dataclass
class Row:
    """``ids``: the tokens; ``read``: positions whose next-token log-probs come back."""

    ids: list[int]
    read: list[int]
    edits: list[Edit] = field(default_factory=list)


def run_rows(runner: Runner, rows: list[Row], max_rows: int, prefix: list[int] | None = None
             ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(row index, [len(read), vocab] float64 log-probs)`` for every row, in batches of
    up to ``max_rows`` (order of the batches: by length).

    ``prefix``: token ids shared by the rows that start with them and edited by none of their
    edits (every edit starts at or after its length); those rows reuse one KV cache of it.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    use_prefix = [prefix is not None and _starts_with(rows[i], prefix) for i in range(len(rows))]
    for cached in (True, False):
        group = [i for i in order if use_prefix[i] == cached]
        kv = _prefix_cache(runner, prefix) if cached and group else None
        for lo in range(0, len(group), max_rows):
            chunk = group[lo:lo + max_rows]
            yield from zip(chunk, _forward(runner, [rows[i] for i in chunk],
                                           len(prefix) if kv is not None and prefix else 0, kv),
                                  strict=True)


def _starts_with(row: Row, prefix: list[int]) -> bool:
    n = len(prefix)
    return (len(row.ids) > n and row.ids[:n] == prefix and min(row.read) >= n
            and all(e.start >= n for e in row.edits))


@torch.no_grad()
def _prefix_cache(runner: Runner, prefix: list[int] | None) -> Any:
    assert prefix is not None
    x = torch.tensor([prefix], device=runner.model.device)
    _, cache = runner.bridge(x, return_type="logits_and_cache", use_cache=True)
    return cache


def _expand(cache: Any, rows: int) -> Any:
    """A fresh cache holding ``rows`` copies of the one-row prefix cache (the forward extends
    the cache it is given in place, so every batch needs its own)."""
    from transformers import DynamicCache

    layers = [(layer.keys.expand(rows, -1, -1, -1).contiguous(),
               layer.values.expand(rows, -1, -1, -1).contiguous()) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=layers)


@torch.no_grad()
def _forward(runner: Runner, rows: list[Row], offset: int, kv: Any) -> list[torch.Tensor]:
    """One batched forward of ``rows`` (tokens from ``offset`` on when ``kv`` holds the
    prefix); per-row log-probs at each row's read positions."""
    x, _ = pad_batch([r.ids[offset:] for r in rows], runner.pad, "right")
    width = x.shape[1]
    per_layer = row_edits([r.edits for r in rows], runner.model.info.d_model, offset,
                          width + offset)
    hooks = [(hook_name("resid_post", layer), _hook(edits)) for layer, edits in per_layer.items()]
    stop = [("ln_final.hook_in", stop_forward)]
    kwargs = {"past_key_values": _expand(kv, len(rows))} if kv is not None else {}
    resid = runner.bridge.run_with_hooks(x.to(runner.model.device), fwd_hooks=[*hooks, *stop],
                                         **kwargs)
    b_idx = torch.tensor([b for b, r in enumerate(rows) for _ in r.read])
    t_idx = torch.tensor([t - offset for r in rows for t in r.read])
    flat = resid[b_idx.to(resid.device), t_idx.to(resid.device)]
    lp = torch.log_softmax(runner.bridge.unembed(runner.bridge.ln_final(flat)).double(), dim=-1)
    return list(lp.split([len(r.read) for r in rows]))


def row_edits(edits: list[list[Edit]], d: int, offset: int = 0, idle: int = 0
              ) -> dict[int, RowEdits]:
    """Row ``b``'s ``edits[b]`` gathered per layer (starts shifted by ``-offset``); a row with no
    edit at a layer gets the neutral one, starting at ``idle``."""
    out: dict[int, RowEdits] = {}
    for layer in sorted({e.layer for row in edits for e in row}):
        per = out[layer] = RowEdits.neutral(len(edits), d)
        per.start[:] = idle
        for b, row in enumerate(edits):
            for e in row:
                if e.layer == layer:
                    per.set(b, e.start - offset, delta=e.delta, u=e.u, lo=e.lo, hi=e.hi)
    return out


def _hook(edits: RowEdits) -> Any:
    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return edits.apply(act)

    return fn
