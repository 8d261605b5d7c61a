"""Greedy decoding with a static KV cache and, on CUDA, one captured CUDA graph per decode step.

HF ``generate`` spends most of a small-batch decode step in Python and kernel launches (for a 7B
model at batch 64 the GPU is idle most of the time). Here the prompt is prefilled once into a
:class:`transformers.StaticCache`, and the step "feed the last token, take the argmax, advance
every counter" is recorded as a CUDA graph whose replays need no host work at all: the next
token, position ids, attention-mask column and output history are all updated on the device.
Every few steps a device-side "has every row ended its turn" flag is copied to pinned host
memory behind the queued steps; the host reads it once its event has fired, so it never waits on
the GPU while steps remain to be queued.

With ``layers``, the residual stream at those blocks is kept as it goes (for fused extraction):
the prefill's ``[B, W, d]`` outputs, and at each step the fed token's ``[B, 1, d]`` written into
a device buffer by a forward hook that the CUDA graph records with the step. Response token ``j``
is fed back in at step ``j + 1``; one extra step feeds the last generated token, so every
response token has its residual.

The model is the plain HF module (no hooks); the attention mask is handed over as a ready 4D
boolean mask ``[batch, 1, query, cache]`` so that HF's mask construction (which syncs with the
host) is skipped. With a mask, HF's SDPA path copies every cached key and value once per query
head group (``repeat_kv``) at every step — a quarter of a 7B decode step at batch 64 (profiled
on an H100). A single query token needs no copy: the query heads that share a key/value head are
laid out as that head's query rows, and one ordinary SDPA call covers them.

Steering: each row may carry its own residual edits (an added vector, a clamp of the projection on
a direction) at a set of blocks, held in device buffers that are rewritten before every batch, so
one captured step serves a whole sweep of vectors (see :meth:`StaticGreedy.capture`).

Fused kernels: for Qwen2/Llama models in bf16 or fp16 on CUDA the RMSNorms, MLP activations,
rotary embedding and each decode step's attention run as single Triton kernels while the decoder
runs (:mod:`tlpersona.runtime.kernels`; ``fused=False`` keeps HF's modules). The attention kernel
reads a block of cache slots only where the row attends to some slot in it, so a step reads the
slots written so far, not the whole static cache. They have no autotuning and fp32 never uses
them: fp32 gives HF ``generate``'s ids exactly; bf16 gives the same ids run to run, not HF's.

Shared prompt prefixes: rows whose prompts start with the same tokens (one persona's system
block across its questions) can have that prefix prefilled once, in a batch of the distinct
prefixes, and its keys and values copied into every row's cache slots; each row's own pass then
starts where the shortest shared stretch ends. Causal attention makes a prefix position's
residual depend on the prefix alone, so this is the same computation over fewer tokens (in bf16
the prefix's last bits depend on the batch it ran in, as any prefill's do; see
:meth:`StaticGreedy.capture`).

Left padding: pad tokens are never attended to and positions count real tokens, as in HF
``generate``. Graphs and caches are kept per (batch, cache length) and reused across batches;
cache lengths are rounded up so that batches of similar prompts share one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from tlpersona.runtime import kernels
from tlpersona.runtime.batching import pad_batch
from tlpersona.runtime.edits import RowEdits, edit

#: cache lengths are rounded up to a multiple of this, so similar batches share a graph
BUCKET = 64
ATTENTION = "tlpersona_decode"
FUSED_ATTENTION = "tlpersona_decode_fused"


def decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF attention function: grouped-query attention for one query token without copying the
    cache (``query [B, Hq, 1, D]``, ``key/value [B, Hkv, L, D]``, mask ``[B, 1, 1, L]``);
    anything else goes to HF's own SDPA function. Returns ``[B, q, Hq, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q, d = query.shape
    hkv = key.shape[1]
    if q != 1 or hq == hkv:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # query head h reads key/value head h // (hq // hkv), as in HF's repeat_kv
    grouped = query.view(b, hkv, hq // hkv, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


def fused_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """:func:`decode_attention` with one query token per row (every decode step, and a prefill
    one column wide) in one Triton kernel (:func:`tlpersona.runtime.kernels.decode_attention`:
    each cached key and value read once, blocks of unwritten slots skipped); wider prefills keep
    SDPA."""
    if kernels.takes_decode_attention(query, key, attention_mask):
        assert attention_mask is not None
        return kernels.decode_attention(query, key, value, attention_mask,
                                        query.shape[-1] ** -0.5 if scaling is None else scaling), None
    return decode_attention(module, query, key, value, attention_mask, scaling=scaling,
                            dropout=dropout, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionInterface.register(FUSED_ATTENTION, fused_decode_attention)


@dataclass
class _Engine:
    """Device buffers of one (batch, cache length) shape, and the captured step."""

    cache: Any
    ids: torch.Tensor  # [B, 1] token fed at the current step
    pos: torch.Tensor  # [B, 1] its position id
    mask: torch.Tensor  # [B, 1, 1, L] bool: which cache slots each row may attend to
    slot: torch.Tensor  # [1] cache slot written at the current step
    step: torch.Tensor  # [1] index into hist of the token produced now
    hist: torch.Tensor  # [B, N + 1] generated tokens (the last column only in capture mode)
    resid: torch.Tensor | None = None  # [layer, B, N + 1, d]: [:, :, j + 1] is response token j's
    # one captured step per steering form (None: unsteered), sharing one memory pool
    graphs: dict[Any, Any] = field(default_factory=dict)
    steer: dict[Any, _Steer] = field(default_factory=dict)
    pool: Any = None


@dataclass
class _Steer:
    """Device copies of a batch's per-row edits at the steered layers (rewritten in place before
    every batch, so a captured step is reused with new vectors): ``delta``/``u`` ``[k, B, d]``,
    ``lo``/``hi`` ``[k, B]`` (``u``, ``lo``, ``hi`` None when only vectors are added),
    ``first`` ``[k, B]`` each row's first edited prefill column (left padding included)."""

    layers: tuple[int, ...]
    delta: torch.Tensor
    u: torch.Tensor | None
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    first: torch.Tensor

    def bounds(self, k: int) -> tuple[torch.Tensor, ...]:
        return () if self.u is None else (self.u[k], self.lo[k], self.hi[k])  # type: ignore[index]


@dataclass
class Captured:
    """One decoded batch with its residual stream at the captured layers (device tensors).

    ``ids[i]``: row i's generated ids (cut after its first end-of-turn token);
    ``prefill[l]``: ``[B, W, d]`` over the left-padded prompts (row i starts at ``pads[i]``);
    ``resid``: ``[layer, B, N, d]``, response token j of each row at ``[:, :, j]``.
    Valid until the decoder's next call.
    """

    ids: list[list[int]]
    prefill: list[torch.Tensor]
    resid: torch.Tensor
    pads: list[int]


class StaticGreedy:
    """Greedy continuations of left-padded prompt batches (see module doc)."""

    def __init__(self, model: Any, max_new_tokens: int, eos: list[int], pad_id: int,
                 use_graphs: bool | None = None, check_every: int = 16,
                 layers: list[int] | None = None, cache_len: int | None = None,
                 fused: bool = True):
        self.model = model
        self.fused = fused
        self.layers = list(layers or [])
        # a fixed cache length (all batches of a run share one graph), else per batch
        self.cache_len = cache_len
        self._prefill_out: dict[int, torch.Tensor] = {}
        self._active: _Engine | None = None
        self._steer: _Steer | None = None
        self._stepping = False
        self.n = max_new_tokens
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.pad = pad_id
        self.device = model.get_input_embeddings().weight.device
        # A graph records one device's stream: a model spread over devices decodes eagerly (so
        # must one loaded with a device map: its forward cannot be captured).
        self.one_device = len({p.device for p in model.parameters()}) == 1
        self.graphs = (self.device.type == "cuda" and self.one_device) if use_graphs is None \
            else use_graphs
        self.check_every = check_every
        self._engines: dict[tuple[int, int], _Engine] = {}

    def _engine(self, batch: int, length: int) -> _Engine:
        key = (batch, length)
        if key not in self._engines:
            from transformers import StaticCache

            dev = self.device
            self._engines[key] = _Engine(
                cache=StaticCache(config=self.model.config, max_cache_len=length),
                ids=torch.zeros((batch, 1), dtype=torch.long, device=dev),
                pos=torch.zeros((batch, 1), dtype=torch.long, device=dev),
                mask=torch.zeros((batch, 1, 1, length), dtype=torch.bool, device=dev),
                slot=torch.zeros(1, dtype=torch.long, device=dev),
                step=torch.zeros(1, dtype=torch.long, device=dev),
                hist=torch.zeros((batch, self.n + 1), dtype=torch.long, device=dev),
                resid=torch.zeros((len(self.layers), batch, self.n + 1, self.model.config.hidden_size),
                                  dtype=self.model.dtype, device=dev) if self.layers else None,
            )
        return self._engines[key]

    def _hook(self, li: int) -> Any:
        """Forward hook of captured block ``li``: keeps the prefill output, and writes a decode
        step's output into the engine's buffer at the current step (recorded by the graph)."""
        def hook(module: Any, args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            e = self._active
            if e is None:
                return
            if self._stepping and e.resid is not None:
                e.resid[li].index_copy_(1, e.step, h)
            else:
                self._prefill_out[li] = h
        return hook

    def _steer_hook(self, k: int) -> Any:
        """Forward hook of the ``k``-th steered block: returns its output edited by the rows'
        operators (from each row's first edited column in the prefill; at every decode step)."""
        def hook(module: Any, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            s = self._steer
            assert s is not None
            new = edit(h, s.delta[k], *s.bounds(k))
            if not self._stepping:
                col = torch.arange(h.shape[1], device=h.device)
                new = torch.where((col[None, :] < s.first[k][:, None])[..., None], h, new)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def _check_steer(self, prompts: list[list[int]], steer: dict[int, RowEdits]) -> None:
        n_blocks = len(self.model.get_decoder().layers)
        for layer, ed in steer.items():
            if not 0 <= layer < n_blocks:
                raise ValueError(f"steer: layer {layer} is not a block of this model (0..{n_blocks - 1})")
            if ed.delta.shape[0] != len(prompts):
                raise ValueError(f"steer: layer {layer} has edits for {ed.delta.shape[0]} rows, "
                                 f"the batch {len(prompts)}")
            over = [i for i, p in enumerate(prompts) if int(ed.start[i]) > len(p)]
            if over:
                raise ValueError(f"steer: row {over[0]}'s edit at layer {layer} starts after its prompt")

    def _steer_buffers(self, e: _Engine, steer: dict[int, RowEdits], prompts: list[list[int]],
                       pads: list[int]) -> _Steer:
        """Copy ``steer`` into the engine's buffers of its form."""
        b = len(prompts)
        layers = tuple(sorted(steer))
        # a batch whose edits only add vectors needs no projection (same values, fewer kernels)
        clamps = any(bool(steer[la].u.any()) for la in layers)
        key = (layers, clamps)
        if key not in e.steer:
            k, d, dev, dt = len(layers), self.model.config.hidden_size, self.device, self.model.dtype
            e.steer[key] = _Steer(
                layers, torch.zeros((k, b, d), dtype=dt, device=dev),
                torch.zeros((k, b, d), dtype=dt, device=dev) if clamps else None,
                torch.zeros((k, b), dtype=dt, device=dev) if clamps else None,
                torch.zeros((k, b), dtype=dt, device=dev) if clamps else None,
                torch.zeros((k, b), dtype=torch.long, device=dev))
        buf = e.steer[key]
        for k, layer in enumerate(layers):
            ed = steer[layer]
            buf.delta[k].copy_(ed.delta)
            if buf.u is not None:
                buf.u[k].copy_(ed.u)
                buf.lo[k].copy_(ed.lo)  # type: ignore[index]
                buf.hi[k].copy_(ed.hi)  # type: ignore[index]
            buf.first[k].copy_(ed.start + torch.tensor(pads))
        return buf

    def _step(self, e: _Engine) -> None:
        """One decode step, entirely on the device (what the CUDA graph records)."""
        e.mask.index_fill_(3, e.slot, True)
        self._stepping = True
        try:
            out = self.model(input_ids=e.ids, attention_mask=e.mask, position_ids=e.pos,
                             past_key_values=e.cache, use_cache=True)
        finally:
            self._stepping = False
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        e.hist.index_copy_(1, e.step, nxt)
        e.ids.copy_(nxt)
        e.pos.add_(1)
        e.slot.add_(1)
        e.step.add_(1)

    def _prefill(self, e: _Engine, ids: torch.Tensor, pads: torch.Tensor) -> None:
        """Run the prompts ``[B, W]`` into the cache and set the buffers for the first step."""
        e.cache.reset()
        w = ids.shape[1]
        self._start(e, self._forward_prefill(ids, pads, e.cache, 0, w, e.mask.shape[-1]), pads, w)

    def _prefill_shared(self, e: _Engine, prompts: list[list[int]], ids: torch.Tensor,
                        pads: list[int], shared: list[int]) -> bool:
        """Prefill with each row's first ``shared[i]`` tokens taken from one pass over the
        distinct prefixes (module doc); False, having done nothing, where that would not save
        tokens or the cache is not plain static layers."""
        from transformers.cache_utils import StaticLayer

        b, w = ids.shape
        # at least the last prompt token runs in the row's own pass: its logits start decoding
        keep = [max(0, min(k, len(p) - 1)) for p, k in zip(prompts, shared, strict=True)]
        distinct: dict[tuple[int, ...], int] = {}
        # a row without a shared prefix copies nothing (its slots before c0 are all padding)
        of = [distinct.setdefault(tuple(p[:k]), len(distinct)) if k else 0
              for p, k in zip(prompts, keep, strict=True)]
        c0 = min(pad + k for pad, k in zip(pads, keep, strict=True))  # the rows' own passes start here
        width = max(keep)
        # the copies below index every layer's cache from the input device, and set the write
        # offset that transformers' static layers keep as a tensor
        if c0 == 0 or len(distinct) * width + b * (w - c0) >= b * w or not self.one_device \
                or any(type(layer) is not StaticLayer
                       or not isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                       for layer in e.cache.layers):
            return False
        e.cache.reset()
        dev = self.device
        # 1. the distinct prefixes, left padded to one width, into a cache of their own
        from transformers import StaticCache

        uniq = [list(t) for t in distinct]
        pre_ids, _ = pad_batch(uniq, self.pad, "left")
        pre_pads = torch.tensor([width - len(u) for u in uniq], device=dev)
        tmp: Any = StaticCache(config=self.model.config, max_cache_len=width)
        self._forward_prefill(pre_ids.to(dev), pre_pads, tmp, 0, width, width)
        pre_out = dict(self._prefill_out)
        # 2. their keys and values into every row's slots before c0 (slot s of row i holds its
        # prompt token s - pads[i], which is prefix token s - pads[i] < keep[i])
        col = torch.arange(c0, device=dev)
        pads_dev = torch.tensor(pads, device=dev)
        keep_dev = torch.tensor(keep, device=dev)
        src = (width - keep_dev[:, None] + col[None, :] - pads_dev[:, None]).clamp(0, width - 1)
        real = (col[None, :] >= pads_dev[:, None])[:, None, :, None]  # [B, 1, c0, 1]
        rows = torch.tensor(of, device=dev)[:, None]
        for layer, part in zip(e.cache.layers, tmp.layers, strict=True):
            if not layer.is_initialized:
                layer.lazy_initialization(part.keys[:1].expand(b, -1, -1, -1),
                                          part.values[:1].expand(b, -1, -1, -1))
            # [B, c0, H, D] (the advanced indices come first) → [B, H, c0, D]
            layer.keys[:, :, :c0] = part.keys[rows, :, src].transpose(1, 2) * real
            layer.values[:, :, :c0] = part.values[rows, :, src].transpose(1, 2) * real
            layer.cumulative_length.fill_(c0)
        # 3. every row from c0 on, attending to the copied slots
        first = self._forward_prefill(ids[:, c0:], pads_dev, e.cache, c0, w, e.mask.shape[-1])
        for li, own in self._prefill_out.items():
            full = own.new_zeros((b, w, own.shape[-1]))
            full[:, c0:] = own
            full[:, :c0] = pre_out[li][rows, src] * real[:, 0]
            self._prefill_out[li] = full
        self._start(e, first, pads_dev, w)
        return True

    def _forward_prefill(self, ids: torch.Tensor, pads: torch.Tensor, cache: Any, c0: int,
                         w: int, length: int) -> torch.Tensor:
        """Run prompt columns ``c0..w`` (``ids [B, w - c0]``, left padding ``pads``) into
        ``cache`` of ``length`` slots, whose slots before ``c0`` are already filled; returns the
        first generated token ``[B, 1]``."""
        col = torch.arange(length, device=self.device)
        row = torch.arange(c0, w, device=self.device)
        real = col[None, :] >= pads[:, None]  # [B, L] not a pad slot
        causal = (col[None, :] <= row[:, None]) & (col[None, :] < w)  # [W, L]
        mask = causal[None] & real[:, None, :]
        # A pad query attends to nothing; let it see itself so its (unused) output stays finite.
        mask |= (col[None, :] == row[:, None])[None]
        pos = (row[None, :] - pads[:, None]).clamp(min=0)
        # only the last position's logits are needed (all of them: batch x width x vocab)
        out = self.model(input_ids=ids, attention_mask=mask[:, None], position_ids=pos,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def _start(self, e: _Engine, first: torch.Tensor, pads: torch.Tensor, w: int) -> None:
        """Set the buffers for the first decode step after a prefill of width ``w``."""
        col = torch.arange(e.mask.shape[-1], device=self.device)
        real = col[None, :] >= pads[:, None]
        e.mask.copy_(real[:, None, None, :] & (col < w)[None, None, None, :])
        e.ids.copy_(first)
        e.pos.copy_((w - pads)[:, None])
        e.slot.fill_(w)
        e.step.fill_(1)
        e.hist.zero_()
        e.hist[:, :1] = first

    def _capture(self, e: _Engine, form: Any) -> None:
        """Record ``_step`` (with the hooks of steering form ``form``) once buffers and cache are
        initialised; the warm-up step that the capture needs is undone by the next prefill,
        which resets everything."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step(e)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # graphs of one engine never run at the same time: their temporaries can share memory
        with torch.cuda.graph(graph, pool=e.pool):
            self._step(e)
        e.pool = graph.pool()
        e.graphs[form] = graph

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], steer: dict[int, RowEdits] | None = None
                 ) -> list[list[int]]:
        """Generated ids per prompt, cut after the first end-of-turn token (kept)."""
        return self.capture(prompts, steer).ids

    @torch.no_grad()
    def capture(self, prompts: list[list[int]], steer: dict[int, RowEdits] | None = None,
                shared: list[int] | None = None) -> Captured:
        """Decode a batch; with ``layers``, also keep its residual stream (:class:`Captured`).

        ``steer``: block index → that block's output edits, one row per prompt
        (:class:`~tlpersona.runtime.edits.RowEdits`: an added vector, and a clamp of the
        projection on a unit direction for ablation and capping; a row with zero vector and zero
        direction is not edited). Layer ``l`` is block ``l``'s output (``resid_post``, HF
        ``hidden_states[l + 1]``). A row's ``start`` counts its own prompt tokens: prompt
        positions from ``start`` on are edited in the prefill, and every decode step is, as in
        an uncached forward of prompt + generated tokens with the same edits. The captured
        layers see the edited stream. Each steering form (layer set; add only or with clamps)
        gets its own captured step, reused for every batch of that form.

        ``shared``: per row, how many leading prompt tokens it shares with the other rows that
        start with the same tokens; those are prefilled once per distinct prefix (module doc).
        The residuals and ids are those of the full prefill up to rounding: exactly so in exact
        arithmetic, and run to run the same bits for the same batches. Not with ``steer``.
        """
        if steer:
            self._check_steer(prompts, steer)
            if shared is not None:
                raise ValueError("capture: shared prefixes are not prefilled apart under steering")
        if shared is not None and len(shared) != len(prompts):
            raise ValueError(f"capture: shared has {len(shared)} rows, the batch {len(prompts)}")
        _register()
        config = self.model.config
        before = config._attn_implementation
        blocks = self.model.get_decoder().layers
        # steering hooks first: a block's edited output is what the capture hook reads
        handles = [blocks[layer].register_forward_hook(self._steer_hook(k))
                   for k, layer in enumerate(sorted(steer or {}))]
        handles += [blocks[layer].register_forward_hook(self._hook(li))
                    for li, layer in enumerate(self.layers)]
        fused = kernels.fused_step_kernels(self.model) if self.fused else contextlib.nullcontext(False)
        try:
            with fused as applied:
                # Set on the config the modules read at call time; HF's setter would also reject
                # a model whose class does not declare support for custom functions.
                config._attn_implementation = FUSED_ATTENTION if applied else ATTENTION
                return self._run(prompts, steer, shared)
        finally:
            for h in handles:
                h.remove()
            self._active = None
            self._steer = None
            config._attn_implementation = before

    def _done_flag(self, e: _Engine, t: int) -> tuple[Any, torch.Tensor]:
        """Queue "every row has ended its turn by token t"; returns (event, flag): on CUDA the
        flag lands in pinned host memory once the event fires (event None elsewhere)."""
        done = torch.isin(e.hist[:, : t + 1], self._eos_dev).any(1).all().view(1)
        if self.device.type != "cuda":
            return None, done
        flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
        flag.copy_(done, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event, flag

    def _run(self, prompts: list[list[int]], steer: dict[int, RowEdits] | None,
             shared: list[int] | None) -> Captured:
        b = len(prompts)
        w = max(len(p) for p in prompts)
        length = self.cache_len or -(-(w + self.n) // BUCKET) * BUCKET
        if length < w + self.n:
            raise ValueError(f"cache_len {length} is shorter than prompt {w} + {self.n} new tokens")
        if (b, length) not in self._engines and len(self._engines) >= 2:
            # each engine holds a full KV cache: keep the two most recent shapes only
            del self._engines[next(iter(self._engines))]
        e = self._engine(b, length)
        self._active = e
        self._eos_dev = self.eos.to(self.device)
        ids, _ = pad_batch(prompts, self.pad, "left")
        pads = [w - len(p) for p in prompts]
        pads_dev = torch.tensor(pads, device=self.device)
        ids = ids.to(self.device)
        self._steer = self._steer_buffers(e, steer, prompts, pads) if steer else None
        form = None if self._steer is None else (self._steer.layers, self._steer.u is not None)
        if self.graphs and form not in e.graphs:
            self._prefill(e, ids, pads_dev)
            self._capture(e, form)
        graph = e.graphs.get(form)
        self._prefill_out = {}
        if shared is None or not self._prefill_shared(e, prompts, ids, pads, shared):
            self._prefill(e, ids, pads_dev)
        # Capturing, one more step feeds the last generated token (its residual is needed).
        last = self.n if self.layers else self.n - 1
        # Every check_every steps a done-flag is queued; it is read one interval later (on the
        # CPU: at the next step), when the flagged tokens have been fed and, on a GPU, the host
        # waits on an event with an interval of steps still queued behind it (no idle GPU).
        pending: tuple[int, Any, torch.Tensor] | None = None
        for t in range(1, last + 1):
            if graph is not None:
                graph.replay()
            else:
                self._step(e)
            if pending is not None and t >= pending[0]:
                _, event, flag = pending
                if event is not None:
                    event.synchronize()
                if bool(flag):
                    break
                pending = None
            if pending is None and (t + 1) % self.check_every == 0 and t < last:
                event, flag = self._done_flag(e, t)
                pending = (t + (self.check_every if event is not None else 1), event, flag)
        stops = set(self.eos.tolist())
        out = []
        for row in e.hist[:, : self.n].tolist():
            cut = next((i for i, tok in enumerate(row) if tok in stops), None)
            out.append(row if cut is None else row[: cut + 1])
        resid = e.resid[:, :, 1:] if e.resid is not None else torch.empty(0)
        return Captured(out, [self._prefill_out[li] for li in range(len(self.layers))], resid, pads)
