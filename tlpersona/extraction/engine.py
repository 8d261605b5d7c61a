"""Single-pass extraction of residual-stream vectors at named positions.

Per persona:

* question-invariant positions (system-block anchors, ``raw_system_last``) come from one short
  forward pass per system-prompt phrasing (the shared prefix, and the raw system text);
* every question-dependent position comes from one forward pass per (phrasing, question) over the
  prompt (plus the response when a response position is asked for), batched by length with an
  attention mask so padding does not change results.

Pooling happens on the model's device: each requested position is a row of weights over the
sequence (one-hot for a token, 1/n over a span for a mean), and one batched matmul reads every
position from each cached layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm import tqdm

from tlpersona.cache.schema import persona_key
from tlpersona.chat.positions import Position
from tlpersona.chat.template import ChatRenderer, Spans, common_prefix_len
from tlpersona.data import Persona, Question, indexed_prompts
from tlpersona.data.responses import Key, Response
from tlpersona.errors import TlpersonaError
from tlpersona.models.layers import check_layers
from tlpersona.models.loading import LoadedModel, stop_forward
from tlpersona.runtime.batching import extract_batch, pad_batch, pad_id

# Two questions that share no leading text: the prefix every conversation of a persona shares
# is at most the common prefix of these two.
_PROBES = ("Zebra?", "1 + 1")


@dataclass
class ExtractConfig:
    """What to extract. ``layers`` index blocks (layer l = ``blocks.{l}.hook_resid_post``)."""

    positions: list[Position]
    layers: list[int]
    prompt_index: int | str = 0
    batch_size: int | None = None  # None: from free memory (tlpersona.runtime.batching)
    padding_side: str = "right"
    include_eot: bool = False
    progress: bool = True

    @property
    def needs_response(self) -> bool:
        return any(p.needs_response for p in self.positions)


@dataclass
class PersonaResult:
    """Vectors for one persona, fp32, keyed by canonical position name.

    ``centroid[pos]``: ``[layer, d_model]``; ``per_question[pos]``: ``[question, layer, d_model]``
    (question-dependent positions only); ``valid[pos]``: ``[question]`` bool.
    """

    centroid: dict[str, torch.Tensor] = field(default_factory=dict)
    per_question: dict[str, torch.Tensor] = field(default_factory=dict)
    valid: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: dict[str, torch.Tensor] = field(default_factory=dict)

    def check_finite(self, persona: str, layers: list[int]) -> None:
        """NaN or inf anywhere is an error naming the persona, position and layer."""
        for kind in (self.centroid, self.per_question):
            for pos, t in kind.items():
                bad = ~torch.isfinite(t)
                if bool(bad.any()):
                    layer = layers[int(bad.nonzero()[0][-2])]
                    raise TlpersonaError(
                        f"non-finite activations (NaN/inf) for persona {persona!r} at layer {layer} "
                        f"({pos}); check the model weights and `dtype`"
                    )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict for a store part: per-question vectors go to fp16."""
        out = {persona_key(k, "centroid"): v.float().cpu() for k, v in self.centroid.items()}
        for k, v in self.per_question.items():
            out[persona_key(k, "per_question")] = v.half().cpu()
            out[persona_key(k, "valid")] = self.valid[k].to(torch.uint8).cpu()
        for k, v in self.n_tokens.items():
            out[persona_key(k, "n_tokens")] = v.float().cpu()
        return out


@dataclass
class PassPlan:
    """Where one persona's forward passes sit in a group's sequence list (indices into it)."""

    n_prompts: int  # phrasings
    prefix: list[int] = field(default_factory=list)  # per phrasing: the system-block pass
    raw: list[int] = field(default_factory=list)  # per phrasing: the raw system text pass
    dep: list[int] = field(default_factory=list)  # per (phrasing, question): the full pass
    has: list[torch.Tensor] = field(default_factory=list)  # per dep pass: [n_dep] bool, row exists
    counts: list[torch.Tensor] = field(default_factory=list)  # per dep pass: [n_dep] tokens pooled


@dataclass
class Prepared:
    """One group's passes, ready for the model: sequences, ``[n_pos, len]`` pooling weights and
    where each persona's passes are."""

    personas: list[Persona]
    n_questions: int
    plans: list[PassPlan]
    seqs: list[list[int]]
    weights: list[torch.Tensor]


@dataclass
class Pooled:
    """A launched group's pooled rows (``[job, position, layer, d]``, length-sorted order) and
    the event marking their arrival on the host (None on the CPU)."""

    rows: torch.Tensor
    order: list[int]
    done: Any

    def host(self) -> torch.Tensor:
        """The rows in job order, once the copy has landed."""
        if self.done is not None:
            self.done.synchronize()
        out = torch.empty_like(self.rows)
        out[torch.tensor(self.order)] = self.rows
        return out


class Extractor:
    """Runs the bridge and pools activations at named positions."""

    def __init__(self, model: LoadedModel, config: ExtractConfig):
        self.model = model
        self.cfg = config
        self.renderer = ChatRenderer(model.tokenizer)
        n = model.info.n_layers
        check_layers(config.layers, n)
        self._hook_names = {f"blocks.{layer}.hook_resid_post": i
                            for i, layer in enumerate(config.layers)}
        # Blocks past the last requested layer, the final norm and the unembedding cannot change
        # what we read: skip them (stop_at_layer, or a stop at the final norm's input).
        top = max(config.layers) + 1
        self._stop_at = top if top < n else None
        self._stop_hooks = ([("ln_final.hook_in", stop_forward)]
                            if top >= n and model.bridge is not None
                            and "ln_final.hook_in" in model.bridge.hook_dict else [])
        self._pad_id = pad_id(model.tokenizer)
        self.batch_size = max(1, config.batch_size) if config.batch_size else None
        self._row = {p.name: i for i, p in enumerate(config.positions)}
        self._anchored = [p for p in config.positions if p.question_invariant and p.kind == "anchored"]
        self._raw = any(p.kind == "raw" for p in config.positions)
        self._dep = [p for p in config.positions if not p.question_invariant]
        self._seed = any(p.anchor == "response_mean_seed" for p in config.positions)

    @torch.no_grad()
    def run(self, seqs: list[list[int]], weights: list[torch.Tensor]) -> torch.Tensor:
        """Pool one batch. ``weights[i]``: ``[n_pos, len(seqs[i])]`` → ``[batch, n_pos, layer, d]``.

        Sequences are padded on ``config.padding_side`` with an attention mask (never derived
        from token ids: some tokenizers pad with their end-of-turn token).
        """
        device = self.model.device
        width = max(len(s) for s in seqs)
        n_pos = weights[0].shape[0]
        ids, mask = pad_batch(seqs, self._pad_id, self.cfg.padding_side)
        w = torch.zeros((len(seqs), n_pos, width), dtype=torch.float32)
        for i, (s, wi) in enumerate(zip(seqs, weights, strict=True)):
            sl = slice(width - len(s), width) if self.cfg.padding_side == "left" else slice(0, len(s))
            w[i, :, sl] = wi
        # Positions count real tokens only (left padding shifts them); passing them also spares
        # the bridge deriving them, which costs a device sync per batch.
        pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos_ids, w = (self._to_device(t) for t in (ids, mask, pos_ids, w))
        names = self._hook_names
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": pos_ids}
        if self._stop_at is not None:
            kwargs["stop_at_layer"] = self._stop_at
        with self.model.bridge.hooks(fwd_hooks=self._stop_hooks):
            _, cache = self.model.bridge.run_with_cache(
                ids, names_filter=lambda name: name in names, **kwargs
            )
        # Spans are pooled in float64: a fp32 mean over a sequence whose first token has
        # activations in the tens of thousands loses ~1e-4 of absolute precision.
        w = w.double()
        out = torch.empty((len(seqs), n_pos, len(names), self.model.info.d_model),
                          dtype=torch.float32, device=device)
        for name, li in names.items():
            # under a device map each layer lives on its own GPU
            out[:, :, li] = torch.bmm(w, cache[name].to(device).double()).float()
        return out

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host-to-device copy that does not make the host wait for queued GPU work."""
        if self.model.device.startswith("cuda"):
            return t.pin_memory().to(self.model.device, non_blocking=True)
        return t.to(self.model.device)

    def _batched(self, seqs: list[list[int]], weights: list[torch.Tensor]) -> Pooled:
        """Queue length-sorted batches of ``run`` and a copy of the results to the host; the
        copy is waited for in :meth:`Pooled.host`, so the caller can queue more work first.

        On CUDA out-of-memory the batch size is halved (and stays halved) and the batch retried.
        """
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        if self.batch_size is None:
            hf = self.model.bridge.original_model
            self.batch_size = extract_batch(self.model.device, hf.config, self.model.dtype,
                                            max(len(s) for s in seqs), len(self.cfg.layers))
        chunks: list[torch.Tensor] = []
        start = 0
        while start < len(order):
            idx = order[start:start + self.batch_size]
            try:
                chunks.append(self.run([seqs[i] for i in idx], [weights[i] for i in idx]))
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise TlpersonaError("out of GPU memory even at batch size 1") from None
                self.batch_size = max(1, self.batch_size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                tqdm.write(f"tlpersona: out of memory; batch size now {self.batch_size}",
                           file=sys.stderr)
                continue
            start += len(idx)
        pooled = torch.cat(chunks)
        if pooled.device.type != "cuda":
            return Pooled(pooled, order, None)
        # One device-to-host copy per group, queued behind its batches: the GPU never waits on
        # the host, and the host learns from an event when the copy has landed.
        host = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=True)
        host.copy_(pooled, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Pooled(host, order, done)

    def _weights(self, positions: list[Position], spans: Spans, length: int) -> torch.Tensor:
        """``[n_all_positions, length]`` pooling weights; rows of other positions stay zero."""
        w = torch.zeros((len(self.cfg.positions), length), dtype=torch.float32)
        for pos in positions:
            start, stop = pos.resolve(spans)
            w[self._row[pos.name], start:stop] = 1.0 / (stop - start)
        return w

    def _conversations(self, persona: Persona, prompts: list[tuple[int, str]],
                       questions: list[Question], responses: dict[Key, Response] | None
                       ) -> list[list[tuple[Spans, Response | None]]]:
        """Every (phrasing, question) conversation, rendered once: ``[phrasing][question]``."""
        cfg = self.cfg
        out = []
        for pidx, system in prompts:
            row = []
            for q in questions:
                resp = (responses or {}).get((persona.name, pidx, q.id)) if cfg.needs_response else None
                ids = resp.ids if resp else None
                if resp is not None and self._seed:
                    # the seed's templated conversation: content, then the template's closing
                    # tokens in place of the end token the model emitted (checked in preflight)
                    ids = resp.ids[: resp.content_len(False)] + self.renderer.turn_close()
                spans = self.renderer.prompt(system, q.text, ids)
                if resp is not None:
                    spans = replace(spans,
                                    response_stop=spans.prompt_len + resp.content_len(cfg.include_eot),
                                    turn_stop=spans.seq_len if self._seed else None)
                row.append((spans, resp))
            out.append(row)
        return out

    def _plan(self, persona: Persona, questions: list[Question],
              responses: dict[Key, Response] | None, seqs: list[list[int]],
              weights: list[torch.Tensor]) -> PassPlan:
        """Append one persona's forward passes to ``seqs``/``weights``; return where they are.

        Per phrasing: one prefix pass for the system-block anchors, one raw-system-text pass,
        and one pass per question for everything else.
        """
        cfg = self.cfg
        prompts = indexed_prompts(persona, cfg.prompt_index)
        convs = self._conversations(persona, prompts, questions, responses)
        plan = PassPlan(len(prompts))
        for (_, system), row in zip(prompts, convs, strict=True):
            if self._anchored:
                probes = [self.renderer.prompt(system, t).ids for t in _PROBES]
                first = row[0][0]
                shared = common_prefix_len([*probes, *(sp.ids[: sp.prompt_len] for sp, _ in row)])
                idx = {p.name: p.resolve(first)[0] for p in self._anchored}
                for name, i in idx.items():
                    if i >= shared:
                        raise TlpersonaError(
                            f"position {name} of persona {persona.name!r} reaches past the system "
                            "block into the question; it is not question-invariant here"
                        )
                length = max(idx.values()) + 1
                plan.prefix.append(len(seqs))
                seqs.append(first.ids[:length])
                weights.append(self._weights(self._anchored, first, length))
            if self._raw:
                ids = self.renderer.raw_system(system)
                plan.raw.append(len(seqs))
                seqs.append(ids)
                w = torch.zeros((len(cfg.positions), len(ids)))
                w[self._row["raw_system_last"], -1] = 1.0
                weights.append(w)
            for spans, resp in row:
                # the seed span exists for an empty response too (the closing tokens alone)
                has = torch.tensor([not p.needs_response or
                                    (resp is not None and (p.anchor == "response_mean_seed"
                                                           or resp.content_len(cfg.include_eot) > 0))
                                    for p in self._dep])
                live = [p for p, h in zip(self._dep, has, strict=True) if h]
                w = self._weights(live, spans, spans.seq_len)
                plan.dep.append(len(seqs))
                seqs.append(spans.ids)
                weights.append(w)
                plan.has.append(has)
                plan.counts.append((w[[self._row[p.name] for p in self._dep]] > 0).sum(1))
        return plan

    def _assemble(self, persona: Persona, plan: PassPlan, pooled: torch.Tensor,
                  n_q: int) -> PersonaResult:
        """Per-persona results from the pooled rows of its passes (``[job, position, L, D]``)."""
        result = PersonaResult()
        for p in self._anchored:
            result.centroid[p.name] = pooled[plan.prefix, self._row[p.name]].mean(0)
        if self._raw:
            result.centroid["raw_system_last"] = pooled[plan.raw, self._row["raw_system_last"]].mean(0)
        if not self._dep:
            return result
        n_prompts = plan.n_prompts
        rows = pooled[plan.dep]
        has = torch.stack(plan.has).view(n_prompts, n_q, len(self._dep))
        n_tok = torch.stack(plan.counts).view(n_prompts, n_q, len(self._dep)).float()
        for j, p in enumerate(self._dep):
            vecs = rows[:, self._row[p.name]].view(n_prompts, n_q, *rows.shape[2:])
            # Average over phrasings that have this row; a question is valid if any does.
            cnt = has[:, :, j].sum(0).float()  # [q]
            summed = (vecs * has[:, :, j, None, None]).sum(0)
            valid = cnt > 0
            per_q = torch.zeros_like(summed)
            per_q[valid] = summed[valid] / cnt[valid, None, None]
            result.per_question[p.name] = per_q
            result.valid[p.name] = valid
            if p.kind == "pooled":
                result.n_tokens[p.name] = n_tok[:, :, j].sum(0) / cnt.clamp(min=1)
            if not bool(valid.any()):
                raise TlpersonaError(f"persona {persona.name!r} has no valid rows for {p.name}")
            result.centroid[p.name] = per_q[valid].mean(0)
        return result

    def personas(self, personas: list[Persona], questions: list[Question],
                 responses: dict[Key, Response] | None = None) -> list[PersonaResult]:
        """Extract every requested position for several personas.

        All their passes go through one length-sorted batch schedule, so batches are full and
        evenly long, and the short system-block passes ride along with the rest.
        """
        return self.finish(self.prepare(personas, questions, responses))

    def prepare(self, personas: list[Persona], questions: list[Question],
                responses: dict[Key, Response] | None = None) -> Prepared:
        """Host-side work for :meth:`personas` (rendering, tokenising, pooling weights); safe to
        run on a thread while the model works on another group."""
        seqs: list[list[int]] = []
        weights: list[torch.Tensor] = []
        plans = [self._plan(p, questions, responses, seqs, weights) for p in personas]
        return Prepared(personas, len(questions), plans, seqs, weights)

    def finish(self, prep: Prepared) -> list[PersonaResult]:
        """Run the model on prepared passes and assemble per-persona results."""
        return self.collect(prep, self.launch(prep))

    def launch(self, prep: Prepared) -> Pooled:
        """Queue the model work of a prepared group (returns once it is queued)."""
        return self._batched(prep.seqs, prep.weights)

    def collect(self, prep: Prepared, pooled: Pooled) -> list[PersonaResult]:
        """Per-persona results of a launched group, on the CPU; safe on a host thread."""
        rows = pooled.host()
        return [self._assemble(p, plan, rows, prep.n_questions)
                for p, plan in zip(prep.personas, prep.plans, strict=True)]

    def persona(self, persona: Persona, questions: list[Question],
                responses: dict[Key, Response] | None = None) -> PersonaResult:
        """Extract every requested position for one persona."""
        return self.personas([persona], questions, responses)[0]
