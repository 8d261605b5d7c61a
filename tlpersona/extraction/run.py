"""Extraction runs into a store: provenance, resume by persona groups, torchrun ranks."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from tlpersona.cache.writer import StoreWriter
from tlpersona.chat.template import template_hash
from tlpersona.data import Persona, Question, content_hash, indexed_prompts, persona_hash, question_hash
from tlpersona.data.responses import Key, Response
from tlpersona.errors import TlpersonaError
from tlpersona.extraction.engine import ExtractConfig, Extractor, Pooled, Prepared
from tlpersona.extraction.preflight import check_context, check_prompts, check_responses
from tlpersona.models.loading import LoadedModel
from tlpersona.runtime.distributed import ranks

P = TypeVar("P")
R = TypeVar("R")


def provenance(model: LoadedModel, cfg: ExtractConfig, personas: list[Persona],
               questions: list[Question], responses_hash: str | None) -> dict[str, Any]:
    """Everything that decides the stored numbers; a resumed run must match it exactly."""
    return provenance_of(model.info.spec, model.info.identity, model.tokenizer, model.dtype, cfg,
                         personas, questions, responses_hash)


def provenance_of(spec: str, identity: str, tokenizer: Any, dtype: torch.dtype, cfg: ExtractConfig,
                  personas: list[Persona], questions: list[Question],
                  responses_hash: str | None) -> dict[str, Any]:
    """:func:`provenance` from its parts, so that a run can be checked before its model loads."""
    return {
        "model": spec,
        "model_identity": identity,
        "template_hash": template_hash(tokenizer),
        "dtype": str(dtype).replace("torch.", ""),
        "layers": list(cfg.layers),
        "positions": [p.name for p in cfg.positions],
        "personas": [p.name for p in personas],
        "persona_hash": persona_hash(personas),
        "questions": [q.id for q in questions],
        "question_hash": question_hash(questions),
        "prompt_index": cfg.prompt_index,
        "include_eot": cfg.include_eot if cfg.needs_response else None,
        "responses_hash": responses_hash,
    }


def responses_digest(responses: dict[Key, Response], personas: list[Persona],
                     questions: list[Question], prompt_index: int | str) -> str:
    """Hash of exactly the responses this run uses (so resumes see the same responses)."""
    keys = []
    for p in personas:
        for k, _ in indexed_prompts(p, prompt_index):
            for q in questions:
                r = responses.get((p.name, k, q.id))
                keys.append([p.name, k, q.id, r.ids if r else None, r.finished if r else None])
    return content_hash(keys)


def schedule_groups(n_personas: int, size: int, rank: int, world: int,
                    finished: Collection[int]) -> tuple[list[list[int]], int, int]:
    """Personas in fixed groups of ``size`` (fixed by the list alone, so that a resumed run
    batches exactly as an uninterrupted one), every ``world``-th group for ``rank``: returns
    (groups still to do, this rank's persona count, how many of those are finished)."""
    groups = [list(range(a, min(a + size, n_personas))) for a in range(0, n_personas, size)]
    mine = groups[rank::world]
    todo = [g for g in mine if not all(i in finished for i in g)]
    total = sum(len(g) for g in mine)
    return todo, total, total - sum(len(g) for g in todo)


def overlap_groups(n: int, prepare: Callable[[int], P], run: Callable[[P], R],
                   save: Callable[[int, P, R], None], saved: Callable[[int], None]) -> None:
    """Groups ``0 … n-1``: ``run`` (the device work) on this thread while one host thread
    prepares the next group and saves the previous one, so the accelerator does not wait on
    tokenisation, host-side pooling or disk between groups. ``saved(k)`` runs here once group
    ``k`` is on disk, in order."""
    with ThreadPoolExecutor(max_workers=1) as host:
        nxt = host.submit(prepare, 0) if n else None
        writing: tuple[int, Future[None]] | None = None
        for k in range(n):
            assert nxt is not None
            prep = nxt.result()
            nxt = host.submit(prepare, k + 1) if k + 1 < n else None
            out = run(prep)
            if writing:
                writing[1].result()
                saved(writing[0])
            writing = (k, host.submit(save, k, prep, out))
        if writing:
            writing[1].result()
            saved(writing[0])


def extract_to_store(model: LoadedModel, cfg: ExtractConfig, personas: list[Persona],
                     questions: list[Question], out: str | Path,
                     responses: dict[Key, Response] | None = None, force_new: bool = False,
                     on_group: Callable[[list[int]], None] | None = None,
                     stats: dict[str, int] | None = None, keep: set[Path] | None = None) -> Path:
    """Extract every persona into a store at ``out``; finished personas are skipped on resume.

    ``stats`` (if given) receives how many personas were ``computed`` and ``reused``; ``keep``
    are files of the run's own input inside ``out`` (a responses file), never removed.
    """
    stats = {} if stats is None else stats
    if not personas:
        raise TlpersonaError("no personas")
    if not questions:
        raise TlpersonaError("no questions")
    digest = None
    if cfg.needs_response:
        if responses is None:
            raise TlpersonaError("response positions need responses (generate them first)")
        digest = responses_digest(responses, personas, questions, cfg.prompt_index)
    extractor = Extractor(model, cfg)
    # Every persona and question against every position, and the responses, before anything is
    # written or computed.
    checked = check_prompts(model.tokenizer, cfg.positions, personas, questions, cfg.prompt_index)
    check_context(checked, model.bridge.cfg.n_ctx)
    if cfg.needs_response:
        check_responses(checked, cfg.positions, responses or {}, model.bridge.cfg.d_vocab,
                        cfg.include_eot, "responses", model.bridge.cfg.n_ctx)
    prov = provenance(model, cfg, personas, questions, digest)
    info = {"n_layers_total": model.info.n_layers, "d_model": model.info.d_model,
            "model_source": model.info.source}
    rk = ranks()
    # Rank 0 creates (or checks) the store first; the others then open it and check it too.
    writer = rk.main_first(lambda: StoreWriter(out, prov, info, force_new=force_new and rk.main,
                                               keep=keep, tidy=rk.main))
    if writer.complete:
        stats.update(computed=0, reused=len(personas))
        return Path(out)
    # Personas go through the model in groups (~2k passes): enough sequences to sort into full,
    # evenly long batches. Groups are fixed by the persona list alone, so a resumed run batches
    # exactly as an uninterrupted one (bit-identical results) and saves whole groups.
    per_persona = len(questions) * len(indexed_prompts(personas[0], cfg.prompt_index))
    size = max(1, min(2048 // per_persona, math.ceil(len(personas) / 8)))
    todo, total, done = schedule_groups(len(personas), size, rk.rank, rk.world, writer.finished())
    bar = tqdm(total=total, initial=done, desc="extract", unit="persona",
               disable=not cfg.progress or not rk.main, file=sys.stderr)
    def saved(k: int) -> None:
        bar.update(len(todo[k]))
        if on_group:
            on_group(todo[k])

    def save(k: int, prep: Prepared, pooled: Pooled) -> None:
        results = extractor.collect(prep, pooled)
        for i, res in zip(todo[k], results, strict=True):
            res.check_finite(personas[i].name, cfg.layers)
        writer.write_group(todo[k][0], [r.tensors() for r in results])

    overlap_groups(len(todo),
                   lambda k: extractor.prepare([personas[i] for i in todo[k]], questions,
                                               responses),
                   extractor.launch, save, saved)
    bar.close()
    stats.update(computed=total - done, reused=done)
    rk.barrier()
    writer.finalize(rk)
    rk.barrier()
    return Path(out)
