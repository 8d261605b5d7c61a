"""Forward passes with residual-stream interventions, read out as next-token log-probabilities.

Shared by activation patching and steering. Hook names are the bridge's TransformerLens hook
points (see :data:`HOOK_POINTS`); hooks are attached for one call only (``run_with_hooks``
removes them afterwards, also when the call raises).

The model is run to the input of the final norm; the norm and the unembedding are then applied
only at the positions a metric reads, so a batch of patched rows never materialises
``[batch, seq, vocab]`` logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tlpersona.chat.template import ChatRenderer, Spans
from tlpersona.errors import TlpersonaError
from tlpersona.extraction.generation import eos_ids, greedy_batch
from tlpersona.models.loading import LoadedModel, stop_forward
from tlpersona.runtime.batching import pad_id

# Component -> hook point of block ``l``. Shapes per row: ``[seq, d_model]``, for ``head``
# ``[seq, n_heads, d_head]`` (each head's attention-weighted values, the output projection's input).
# The attention output is read where the output projection hands it back (``attn.o.hook_out``):
# with HF's own SDPA attention inside the bridge (the CUDA default, see models.use_hf_attention)
# the bridge's ``hook_attn_out`` never fires, while this one (and ``attn.hook_z``) does in both
# modes. Without a bias in the attention block (Llama, Qwen2, SmolLM) it is the block's attention
# output before the residual add.
HOOK_POINTS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.attn.o.hook_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "head": "blocks.{}.attn.hook_z",
}
HOOKS = tuple(HOOK_POINTS)
Hook = tuple[str, Callable[..., Any]]


def hook_name(kind: str, layer: int) -> str:
    """TransformerLens hook name of component ``kind`` (one of :data:`HOOKS`) of block ``layer``."""
    if kind not in HOOK_POINTS:
        raise TlpersonaError(f"unknown hook {kind!r} ({', '.join(HOOKS)})")
    return HOOK_POINTS[kind].format(layer)


@dataclass
class Conversation:
    """One rendered prompt, optionally followed by teacher-forced response tokens.

    ``read`` are the positions whose next-token distributions a metric compares: the last
    prompt token and every teacher-forced token.
    """

    spans: Spans

    @property
    def ids(self) -> list[int]:
        return self.spans.ids

    @property
    def read(self) -> list[int]:
        return list(range(self.spans.prompt_len - 1, self.spans.seq_len))


class Runner:
    """Batched forwards of one bridged model with caller-supplied hooks."""

    def __init__(self, model: LoadedModel, max_rows: int = 32):
        self.model = model
        self.bridge = model.bridge
        self.renderer = ChatRenderer(model.tokenizer)
        self.max_rows = max(1, max_rows)
        self.eos = eos_ids(self.bridge.original_model, model.tokenizer)
        self.pad = pad_id(model.tokenizer, self.eos)

    def conversation(self, system: str, question: str, response: list[int] | None = None
                     ) -> Conversation:
        return Conversation(self.renderer.prompt(system, question, response or None))

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        """Plain HF greedy continuations (up to ``n`` tokens, cut after end-of-turn)."""
        if n <= 0:
            return [[] for _ in prompts]
        out = greedy_batch(self.bridge.original_model, prompts, n, self.eos, self.pad)
        return [r.ids for r in out]

    @torch.no_grad()
    def logprobs(self, ids: list[int], read: list[int], rows: int = 1,
                 hooks: list[Hook] | None = None) -> torch.Tensor:
        """Run ``rows`` copies of one sequence with ``hooks``; log-probs at ``read``.

        Returns ``[rows, len(read), vocab]`` float64. Hooks see the full ``[rows, seq, d]``
        activation and may edit rows independently.
        """
        return self.readout(self.final(ids, read, rows, hooks))

    def final(self, ids: list[int], read: list[int], rows: int = 1,
              hooks: list[Hook] | None = None) -> torch.Tensor:
        """Like :meth:`logprobs`, but the residual stream before the final norm at ``read``:
        ``[rows, len(read), d]`` in the model's dtype. Records the autograd graph when called
        with gradients enabled (attribution patching)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device).expand(rows, -1)
        stop = [("ln_final.hook_in", stop_forward)]
        resid = self.bridge.run_with_hooks(x, fwd_hooks=[*(hooks or []), *stop])
        return resid[:, torch.tensor(read, device=resid.device)]

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` residuals before the final norm → ``[..., vocab]`` float64 log-probs."""
        logits = self.bridge.unembed(self.bridge.ln_final(resid))
        return torch.log_softmax(logits.double(), dim=-1)

    @torch.no_grad()
    def cache(self, ids: list[int], names: list[str], read: list[int] | None = None
              ) -> dict[str, torch.Tensor]:
        """Activations ``name -> [seq, ...]`` of one unhooked run (an error names a hook point
        that did not fire). With ``read``, the same forward's log-probs there come back too,
        under the key ``"logprobs"`` (``[len(read), vocab]``)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        wanted = set(names)
        stop = [("ln_final.hook_in", stop_forward)]
        with self.bridge.hooks(fwd_hooks=stop):
            resid, cache = self.bridge.run_with_cache(x, names_filter=lambda n: n in wanted)
        missing = [n for n in names if n not in cache.cache_dict]
        if missing:
            raise TlpersonaError(f"hook point {missing[0]} did not fire in this model")
        out = {n: cache[n][0] for n in names}
        if read is not None:
            out["logprobs"] = self.readout(resid[0, torch.tensor(read, device=resid.device)])
        return out

    def hook_free(self) -> bool:
        """True when no forward hook is left attached anywhere in the bridge."""
        return all(not hp._forward_hooks for hp in self.bridge.hook_dict.values())


def kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) over the last axis of two log-prob tensors (float64)."""
    return (ref.exp() * (ref - other)).sum(-1).clamp(min=0.0)
