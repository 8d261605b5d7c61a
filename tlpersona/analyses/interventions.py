"""Forward passes with residual-stream interventions, read out as next-token log-probabilities.

Shared by activation patching and steering. Hook names are TransformerLens's
(``blocks.{l}.hook_resid_post`` / ``hook_resid_pre``); hooks are attached for one call only
(``run_with_hooks`` removes them afterwards, also when the call raises).

The model is run to the input of the final norm; the norm and the unembedding are then applied
only at the positions a metric reads, so a batch of patched rows never materialises
``[batch, seq, vocab]`` logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tlpersona.conversation import ChatRenderer, Spans
from tlpersona.errors import TlpersonaError
from tlpersona.generation import eos_ids, greedy_batch
from tlpersona.models import LoadedModel, stop_forward

HOOKS = ("resid_post", "resid_pre")
Hook = tuple[str, Callable[..., Any]]


def hook_name(kind: str, layer: int) -> str:
    """TransformerLens hook name of the residual stream after (``resid_post``) or before
    (``resid_pre``) block ``layer``."""
    from transformer_lens.utilities import get_act_name

    if kind not in HOOKS:
        raise TlpersonaError(f"unknown hook {kind!r} (resid_post or resid_pre)")
    return str(get_act_name(kind, layer))


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
        self._pad = model.tokenizer.pad_token_id or 0

    def conversation(self, system: str, question: str, response: list[int] | None = None
                     ) -> Conversation:
        return Conversation(self.renderer.prompt(system, question, response or None))

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        """Plain HF greedy continuations (up to ``n`` tokens, cut after end-of-turn)."""
        if n <= 0:
            return [[] for _ in prompts]
        out = greedy_batch(self.bridge.original_model, prompts, n, self.eos, self._pad)
        return [r.ids for r in out]

    @torch.no_grad()
    def logprobs(self, ids: list[int], read: list[int], rows: int = 1,
                 hooks: list[Hook] | None = None) -> torch.Tensor:
        """Run ``rows`` copies of one sequence with ``hooks``; log-probs at ``read``.

        Returns ``[rows, len(read), vocab]`` float64. Hooks see the full ``[rows, seq, d]``
        activation and may edit rows independently.
        """
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device).expand(rows, -1)
        stop = [("ln_final.hook_in", stop_forward)]
        return self._readout(self.bridge.run_with_hooks(x, fwd_hooks=[*(hooks or []), *stop]),
                             read)

    def _readout(self, resid: torch.Tensor, read: list[int]) -> torch.Tensor:
        at = torch.tensor(read, device=resid.device)
        logits = self.bridge.unembed(self.bridge.ln_final(resid[:, at]))
        return torch.log_softmax(logits.double(), dim=-1)

    @torch.no_grad()
    def cache(self, ids: list[int], names: list[str]) -> dict[str, torch.Tensor]:
        """Activations ``name -> [seq, d]`` of one unhooked run."""
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        wanted = set(names)
        stop = [("ln_final.hook_in", stop_forward)]
        with self.bridge.hooks(fwd_hooks=stop):
            _, cache = self.bridge.run_with_cache(x, names_filter=lambda n: n in wanted)
        return {n: cache[n][0] for n in names}

    def hook_free(self) -> bool:
        """True when no forward hook is left attached anywhere in the bridge."""
        return all(not hp._forward_hooks for hp in self.bridge.hook_dict.values())


def kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) over the last axis of two log-prob tensors (float64)."""
    return (ref.exp() * (ref - other)).sum(-1).clamp(min=0.0)
