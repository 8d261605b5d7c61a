"""Fused generation and extraction: one pass of the model over every prompt and response.

When the responses are generated here, the static decoder (:mod:`tlpersona.runtime.decode`) already runs
every token of the conversation through the model: the prompt in the prefill, response token
``j`` when it is fed back in at step ``j + 1``. Forward hooks keep the residual stream at the
requested blocks as it goes, and each decoded batch is pooled into every recipe on the device
with the same pooling rows as the two-pass path (:class:`tlpersona.extraction.Extractor`), so no
second forward pass over prompt + response is needed. Question-invariant positions (system-block
anchors, the raw system text) are still read once per persona and phrasing, in a short plain-HF
pass.

The store format, resume (whole groups of personas) and torchrun ranks (every n-th group) work
as in :func:`tlpersona.extraction.extract_to_store`; groups hold ~2k passes whatever the number of
personas, so that decode batches are full. Each group's responses are appended (and fsynced) to
the responses file before its store part is written. Until the store is finalised its
provenance names the responses as generated in this pass (:data:`MARK`); finalising records
the digest of the responses actually used, exactly as a two-pass run does. A resumed group whose
saved response differs from the one decoded again is read in a separate teacher-forced pass over
the saved tokens, so a stored vector always belongs to the response on disk.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tlpersona.cache.schema import MANIFEST
from tlpersona.cache.writer import StoreWriter
from tlpersona.chat.template import Spans, common_prefix_len, template_hash
from tlpersona.data import Persona, Question, indexed_prompts
from tlpersona.data.provenance import header as response_header
from tlpersona.data.provenance import prompt_sha
from tlpersona.data.responses import (
    Key,
    Response,
    append_lines,
    drop_torn_tail,
    merge_rank_files,
    read_responses,
    response_line,
)
from tlpersona.errors import TlpersonaError
from tlpersona.extraction import (
    ExtractConfig,
    Extractor,
    PassPlan,
    PersonaResult,
    Prepared,
    overlap_groups,
    provenance,
    responses_digest,
    schedule_groups,
)
from tlpersona.extraction.generation import check_prompts, eos_ids, prompt_jobs
from tlpersona.models.loading import LoadedModel, ModelInfo, input_device
from tlpersona.runtime.batching import generate_batch, pad_id
from tlpersona.runtime.decode import StaticGreedy
from tlpersona.runtime.distributed import ranks

#: provenance ``responses_hash`` of a fused store until it is finalised
MARK = "fused: generated in the extraction pass"
#: rows pooled at once in float64 (bounds the temporary copies)
POOL_ROWS = 64
#: passes per group of personas
GROUP_PASSES = 2048


@dataclass
class FusedConfig:
    """Generation settings of a fused run; ``batch_size`` None sizes decode batches from free
    memory (:func:`tlpersona.runtime.batching.generate_batch`)."""

    max_new_tokens: int
    batch_size: int | None = None
    graphs: bool = True


@dataclass
class GroupOutput:
    """One group's pooled rows (``[job, position, layer, d]`` fp32 on the CPU, in the job order
    of :meth:`Extractor.prepare`), its plans, and the responses decoded for it; ``weights``,
    ``dep`` and ``job_of`` (the decoded jobs' pooling rows, those jobs, job → (plan, slot))
    complete the plans on the host thread (:meth:`FusedExtractor.assemble`)."""

    personas: list[Persona]
    plans: list[PassPlan]
    rows: torch.Tensor
    responses: dict[Key, Response]
    weights: list[torch.Tensor]
    dep: list[int]
    job_of: dict[int, tuple[int, int]]


def hooked_pool(hf: Any, layers: list[int], seqs: list[list[int]], weights: list[torch.Tensor],
                pad: int, batch_size: int) -> torch.Tensor:
    """Plain-HF forwards (right padded, attention mask) pooled like :meth:`Extractor.run`:
    ``weights[i]`` ``[n_pos, len(seqs[i])]`` → ``[len(seqs), n_pos, layer, d]`` fp32 (CPU).

    Block outputs are read by forward hooks (``blocks.l.hook_resid_post``, before any final
    norm); only the last position's logits are computed.
    """
    device = torch.device(input_device(hf))
    blocks = hf.get_decoder().layers
    grabbed: dict[int, torch.Tensor] = {}
    handles = [blocks[layer].register_forward_hook(
        lambda m, a, o, li=li: grabbed.__setitem__(li, o[0] if isinstance(o, tuple) else o))
        for li, layer in enumerate(layers)]
    n_pos = weights[0].shape[0] if weights else 0
    out = torch.empty((len(seqs), n_pos, len(layers), hf.config.hidden_size))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    try:
        with torch.no_grad():
            for a in range(0, len(order), batch_size):
                idx = order[a:a + batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                w = torch.zeros((len(idx), n_pos, width), dtype=torch.float64)
                for j, i in enumerate(idx):
                    ids[j, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[j, : len(seqs[i])] = 1
                    w[j, :, : len(seqs[i])] = weights[i]
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                hf(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=pos.to(device), logits_to_keep=1)
                w = w.to(device)
                pooled = torch.stack([torch.bmm(w, grabbed[li].to(device).double())
                                      for li in range(len(layers))], dim=2)
                out[torch.tensor(idx)] = pooled.float().cpu()
    finally:
        for h in handles:
            h.remove()
    return out


class FusedExtractor:
    """Decodes the prompts of a group of personas and pools every requested position from the
    same forward passes (see module doc)."""

    def __init__(self, hf: Any, tokenizer: Any, info: ModelInfo, cfg: ExtractConfig,
                 fcfg: FusedConfig):
        self.hf = hf
        self.cfg = cfg
        self.fcfg = fcfg
        self.device = torch.device(input_device(hf))
        # The extractor supplies planning (rendering, pooling rows, checks) and assembly; the
        # model work is done here, on the plain HF model.
        self.loaded = LoadedModel(None, tokenizer, info, str(self.device), hf.dtype)
        self.ex = Extractor(self.loaded, cfg)
        self.eos = eos_ids(hf, tokenizer)
        self.pad = pad_id(tokenizer, self.eos)
        self.decoder = StaticGreedy(hf, fcfg.max_new_tokens, self.eos, self.pad,
                                    use_graphs=None if fcfg.graphs else False, layers=cfg.layers)
        self._cap: int | None = None
        self._resp_rows = [(self.ex._row[p.name], p) for p in cfg.positions if p.needs_response]

    def keys(self, personas: list[Persona], questions: list[Question]) -> list[Key]:
        """Keys of the question-dependent passes, in the order :meth:`Extractor._plan` appends
        them."""
        return [(p.name, pidx, q.id) for p in personas
                for pidx, _ in indexed_prompts(p, self.cfg.prompt_index) for q in questions]

    def _response_weights(self, w: torch.Tensor, prompt_len: int, resp: Response) -> torch.Tensor:
        """``w`` (prompt-only rows, ``[n_pos, prompt_len]``) extended over the response, with
        the response positions' rows filled as the two-pass path would fill them."""
        full = torch.zeros((w.shape[0], prompt_len + len(resp.ids)), dtype=w.dtype)
        full[:, :prompt_len] = w
        content = resp.content_len(self.cfg.include_eot)
        if content <= 0:
            return full
        spans = Spans(ids=[0] * (prompt_len + len(resp.ids)), prompt_len=prompt_len,
                      anchors={"resp_start": prompt_len}, response_stop=prompt_len + content)
        for row, pos in self._resp_rows:
            start, stop = pos.resolve(spans)
            full[row, start:stop] = 1.0 / (stop - start)
        return full

    def _fix_plan(self, plans: list[PassPlan], job_of: dict[int, tuple[int, int]],
                  weights: list[torch.Tensor], dep: list[int]) -> None:
        """Recompute which question-dependent rows exist and their token counts, now that the
        responses (and so the response positions' rows) are known."""
        rows = [self.ex._row[p.name] for p in self.ex._dep]
        for j in dep:
            k, slot = job_of[j]
            w = weights[j]
            plans[k].has[slot] = torch.tensor([bool((w[r] > 0).any()) or not p.needs_response
                                                  for r, p in zip(rows, self.ex._dep, strict=True)])
            plans[k].counts[slot] = (w[rows] > 0).sum(1)

    def prepare(self, personas: list[Persona], questions: list[Question]) -> Prepared:
        """Host-side work of a group (rendering, pooling rows of the prompts; the responses'
        rows come once they are decoded); safe on a host thread."""
        return self.ex.prepare(personas, questions, None)

    def group(self, prep: Prepared, questions: list[Question],
              have: dict[Key, Response]) -> GroupOutput:
        """Decode and pool one prepared group; ``have``: responses already saved (a resumed
        group)."""
        personas, seqs, weights, plans = prep.personas, prep.seqs, prep.weights, prep.plans
        dep = [j for plan in plans for j in plan.dep]
        job_of = {j: (k, slot) for k, plan in enumerate(plans) for slot, j in enumerate(plan.dep)}
        keys = self.keys(personas, questions)
        n_pos, n_layers = len(self.cfg.positions), len(self.cfg.layers)
        # on the device until the group is done: one copy to the host instead of one per batch
        rows = torch.empty((len(seqs), n_pos, n_layers, self.hf.config.hidden_size),
                           device=self.device)
        invariant = [j for plan in plans for j in plan.prefix + plan.raw]
        if invariant:
            rows[torch.tensor(invariant, device=self.device)] = hooked_pool(
                self.hf, self.cfg.layers, [seqs[j] for j in invariant],
                [weights[j] for j in invariant], self.pad, 64).to(self.device)
        # tokens every prompt of one persona phrasing starts with (its system block at least)
        by_phrasing: dict[tuple[str, int], list[list[int]]] = {}
        for i, j in enumerate(dep):
            by_phrasing.setdefault(keys[i][:2], []).append(seqs[j])
        common = {k: common_prefix_len(v) for k, v in by_phrasing.items()}
        order = sorted(range(len(dep)), key=lambda i: (len(seqs[dep[i]]), i))
        width = max(len(seqs[j]) for j in dep)
        bs = self.fcfg.batch_size or generate_batch(
            self.device, self.hf.config, self.hf.dtype, len(dep), width,
            self.fcfg.max_new_tokens, n_layers)
        bs = min(bs, self._cap or bs)  # an out-of-memory back-off holds for later groups
        responses: dict[Key, Response] = {}
        forced: list[int] = []  # saved responses that the decoder did not reproduce
        start = 0
        while start < len(order):
            idx = [dep[i] for i in order[start:start + bs]]
            kidx = [keys[i] for i in order[start:start + bs]]
            shared = [common[k[:2]] for k in kidx]
            try:
                self._decode(idx, kidx, seqs, weights, rows, have, responses, forced, shared)
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise TlpersonaError("out of GPU memory even at batch size 1") from None
                bs = self._cap = max(1, bs // 2)
                self.decoder._engines.clear()
                torch.cuda.empty_cache()
                tqdm.write(f"tlpersona: out of memory; decode batch size now {bs}", file=sys.stderr)
                continue
            start += len(idx)
        if forced:
            rows[torch.tensor(forced, device=self.device)] = hooked_pool(
                self.hf, self.cfg.layers, [seqs[j] for j in forced],
                [weights[j] for j in forced], self.pad, 16).to(self.device)
        return GroupOutput(personas, plans, rows.cpu(), responses, weights, dep, job_of)

    def _decode(self, idx: list[int], kidx: list[Key], seqs: list[list[int]],
                weights: list[torch.Tensor], rows: torch.Tensor, have: dict[Key, Response],
                responses: dict[Key, Response], forced: list[int],
                shared: list[int]) -> None:
        """Decode one batch of passes ``idx`` and pool their rows into ``rows``; ``shared``:
        each pass's prompt prefix common to its persona phrasing (prefilled once)."""
        cap = self.decoder.capture([seqs[j] for j in idx], shared=shared)
        n = self.fcfg.max_new_tokens
        width = max(len(seqs[j]) for j in idx)
        n_pos = len(self.cfg.positions)
        comb = torch.zeros((len(idx), n_pos, width + n), dtype=torch.float64)
        # What this batch decides about its passes is kept aside until its rows are pooled: an
        # out-of-memory error on the way retries the batch from the state it started in.
        new_weights: dict[int, torch.Tensor] = {}
        new_seqs: dict[int, list[int]] = {}
        new_forced: list[int] = []
        new_responses: dict[Key, Response] = {}
        for b, (j, key, ids) in enumerate(zip(idx, kidx, cap.ids, strict=True)):
            resp = Response(ids, bool(ids) and ids[-1] in self.eos, prompt_sha(seqs[j]))
            prompt_len = len(seqs[j])
            saved = have.get(key)
            if saved is not None and saved.ids != resp.ids:
                # read later over the saved tokens; this batch's rows for it are not used
                new_weights[j] = self._response_weights(weights[j], prompt_len, saved)
                new_seqs[j] = seqs[j] + saved.ids
                new_forced.append(j)
                continue
            new_responses[key] = resp
            full = self._response_weights(weights[j], prompt_len, resp)
            new_weights[j] = full
            pad = cap.pads[b]
            comb[b, :, pad:width] = full[:, :prompt_len]
            comb[b, :, width:width + len(ids)] = full[:, prompt_len:]
        comb = comb.to(self.device)
        out = torch.empty((len(idx), n_pos, len(self.cfg.layers), self.hf.config.hidden_size),
                          device=self.device)
        for a in range(0, len(idx), POOL_ROWS):
            sl = slice(a, a + POOL_ROWS)
            for li in range(len(self.cfg.layers)):
                pooled = torch.bmm(comb[sl, :, :width], cap.prefill[li][sl].double())
                pooled += torch.bmm(comb[sl, :, width:], cap.resid[li][sl].double())
                out[sl, :, li] = pooled.float()
        skip = set(new_forced)
        keep = [b for b, j in enumerate(idx) if j not in skip]
        if keep:
            rows[torch.tensor([idx[b] for b in keep], device=self.device)] = \
                out[torch.tensor(keep, device=self.device)]
        for j, w in new_weights.items():
            weights[j] = w
        for j, seq in new_seqs.items():
            seqs[j] = seq
        forced.extend(new_forced)
        responses.update(new_responses)

    def assemble(self, out: GroupOutput, n_questions: int) -> list[PersonaResult]:
        """The group's persona results (host work: runs on the host thread)."""
        self._fix_plan(out.plans, out.job_of, out.weights, out.dep)
        return [self.ex._assemble(p, plan, out.rows, n_questions)
                for p, plan in zip(out.personas, out.plans, strict=True)]


def fused_marked(out: str | Path) -> bool:
    """Whether ``out`` holds an unfinished fused store (its responses are this pass's)."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("provenance", {}).get("responses_hash") == MARK
    except json.JSONDecodeError:
        return False


def _append(path: Path, tokenizer: Any, responses: dict[Key, Response], saved: set[Key],
            header: dict[str, Any] | None) -> None:
    """Append the responses not yet ``saved`` as JSONL lines (the generate format, with the
    provenance ``header`` first in a new file), fsynced."""
    new = [(k, r) for k, r in responses.items() if k not in saved]
    if not new:
        return
    head = ([json.dumps(header) + "\n"] if header is not None
            and (not path.exists() or path.stat().st_size == 0) else [])
    append_lines(path, head + [response_line(k, r, tokenizer.decode(r.ids, skip_special_tokens=True))
                               for k, r in new])
    saved.update(k for k, _ in new)


def fusable(cfg: ExtractConfig) -> bool:
    """Whether one decoding pass can read every position: not ``response_mean_seed``, whose
    closing tokens come after the generated ones and are never fed to the model while decoding."""
    return not any(p.anchor == "response_mean_seed" for p in cfg.positions)


def fused_extract_to_store(hf: Any, tokenizer: Any, info: ModelInfo, cfg: ExtractConfig,
                           fcfg: FusedConfig, personas: list[Persona], questions: list[Question],
                           out: str | Path, responses_path: str | Path,
                           stats: dict[str, int] | None = None,
                           header: dict[str, Any] | None = None) -> Path:
    """Generate the responses into ``responses_path`` and extract every persona into a store at
    ``out`` in one pass per group (see module doc); finished groups are skipped on resume.
    ``header`` (:func:`tlpersona.data.provenance.header`; by default built from the model
    and these settings) starts the responses file, so the file is recognisably ours on resume."""
    stats = {} if stats is None else stats
    if not personas:
        raise TlpersonaError("no personas")
    if not questions:
        raise TlpersonaError("no questions")
    if not cfg.needs_response:
        raise TlpersonaError("fused extraction is for runs with response positions")
    if not fusable(cfg):
        raise TlpersonaError("response_mean_seed reads the template's closing tokens after each "
                             "response, which decoding never feeds; extract it in a second pass")
    if header is None:
        header = response_header(info.identity, template_hash(tokenizer),
                                 str(hf.dtype).replace("torch.", ""), fcfg.max_new_tokens)
    fx = FusedExtractor(hf, tokenizer, info, cfg, fcfg)
    fx.ex._plan(personas[0], questions[:1], None, [], [])  # template/position errors first
    prov = provenance(fx.loaded, cfg, personas, questions, MARK)
    meta = {"n_layers_total": info.n_layers, "d_model": info.d_model, "model_source": info.source}
    main = Path(responses_path)
    # read-only from here; the host thread tracks what it adds. A saved response is reused (or
    # read teacher-forced) only where it continues this run's prompt, as generation requires.
    have = read_responses(main, resume=True)
    check_prompts(have, {key: prompt_sha(ids) for key, ids in
                         prompt_jobs(tokenizer, personas, questions, cfg.prompt_index)}, main)
    rk = ranks()
    writer = rk.main_first(lambda: StoreWriter(out, prov, meta, tidy=rk.main))
    if writer.complete:
        stats.update(computed=0, reused=len(personas))
        return Path(out)
    path = main if rk.world == 1 else main.with_name(f"{main.stem}.rank{rk.rank}{main.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(path)
    saved = set(have)
    # Groups of ~2k passes, fixed by the data alone (so a resumed run, and any number of
    # torchrun ranks, batch exactly as one uninterrupted process): big enough for full decode
    # batches even in a short run.
    per_persona = len(questions) * len(indexed_prompts(personas[0], cfg.prompt_index))
    size = max(1, GROUP_PASSES // per_persona)
    todo, total, done = schedule_groups(len(personas), size, rk.rank, rk.world, writer.finished())
    bar = tqdm(total=total, initial=done, desc="generate+extract", unit="persona",
               disable=not cfg.progress or not rk.main, file=sys.stderr)

    def save(k: int, prep: Prepared, result: GroupOutput) -> None:
        # responses first: a store part never refers to responses that are not on disk
        _append(path, tokenizer, result.responses, saved, header)
        results = fx.assemble(result, len(questions))
        for i, res in zip(todo[k], results, strict=True):
            res.check_finite(personas[i].name, cfg.layers)
        writer.write_group(todo[k][0], [r.tensors() for r in results])

    # the model decodes a group while the host renders the next and writes the previous one
    overlap_groups(len(todo), lambda k: fx.prepare([personas[i] for i in todo[k]], questions),
                   lambda prep: fx.group(prep, questions, have), save,
                   lambda k: bar.update(len(todo[k])))
    bar.close()
    stats.update(computed=total - done, reused=done)
    rk.barrier()
    if rk.main:
        merge_rank_files(main)
        used = read_responses(main, resume=True)
        # from here on the store is indistinguishable from a two-pass one over these responses
        writer.manifest["provenance"]["responses_hash"] = responses_digest(
            used, personas, questions, cfg.prompt_index)
    writer.finalize(rk)
    rk.barrier()
    return Path(out)
