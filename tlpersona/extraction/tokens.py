"""Every token's residual in multi-turn conversations: one bridge forward per conversation.

A conversation (system, user and assistant messages in any number of turns) is rendered once with
the tokenizer's own chat template and tokenised once; each message's content is located in the
rendered text by character offsets, which gives its token span. The whole conversation then goes
through the bridge once (several conversations per batch, right-padded with an attention mask),
and ``blocks.{l}.hook_resid_post`` is read at every token: no turn is run again on its own.

Layer ``l`` is the output of block ``l``, HF ``hidden_states[l+1]`` (for the last block: before
the final norm, which HF's last hidden state includes).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch

from tlpersona.chat.template import ChatRenderer
from tlpersona.errors import TlpersonaError
from tlpersona.models.layers import check_layers
from tlpersona.models.loading import LoadedModel, stop_forward
from tlpersona.runtime.batching import extract_batch, pad_batch, pad_id

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """One chat conversation. ``persona``: the stored persona whose own band its assistant
    turns are held to (None: found from the system message where it is a stored persona's
    prompt, else no own band)."""

    messages: tuple[Message, ...]
    label: str = ""
    persona: str | None = None
    # where it was read from (``file:line``), for errors; not part of what it is
    origin: str = field(default="", compare=False, repr=False)

    @classmethod
    def of(cls, messages: Sequence[Mapping[str, object]], label: str = "",
           persona: str | None = None, origin: str = "") -> Conversation:
        """A checked conversation from chat messages as most tools write them
        (``[{"role": "user", "content": "…"}, …]``); ``origin`` (``file:line``) names it in
        errors."""
        where = origin or "`conversations`"
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise TlpersonaError(f"{where}: expected a list of chat messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise TlpersonaError(f"{where}: message {i} is not an object with a role and content")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise TlpersonaError(f"{where}: message {i} has role {role!r} (system, user or "
                                     "assistant)")
            if not isinstance(content, str):
                raise TlpersonaError(f"{where}: message {i} has no content string")
            out.append(Message(cast(Role, role), content))
        conv = cls(tuple(out), label, persona, origin)
        check_conversation(conv, where)
        return conv

    @property
    def system(self) -> str | None:
        """The system message's text, if the conversation has one."""
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None


def check_conversation(conv: Conversation, where: str) -> None:
    """One line naming what makes ``conv`` unreadable: no messages, an empty message, a system
    message anywhere but first, or no assistant turn."""
    if not conv.messages:
        raise TlpersonaError(f"{where}: no messages")
    for i, m in enumerate(conv.messages):
        if m.role not in ROLES:
            raise TlpersonaError(f"{where}: message {i} has role {m.role!r} (system, user or assistant)")
        if not m.content.strip():
            raise TlpersonaError(f"{where}: message {i} ({m.role}) is empty")
        if m.role == "system" and i > 0:
            raise TlpersonaError(f"{where}: message {i} is a system message; only the first may be")
    if not any(m.role == "assistant" for m in conv.messages):
        raise TlpersonaError(f"{where}: no assistant turn to follow")


@dataclass(frozen=True)
class MessageSpan:
    """Half-open token range ``[start, stop)`` of one message's content."""

    role: Role
    start: int
    stop: int


@dataclass(frozen=True)
class Rendered:
    """A conversation as the model reads it: token ids and one span per message (in order)."""

    ids: list[int]
    spans: list[MessageSpan]


def _template_messages(renderer: ChatRenderer, conv: Conversation) -> list[dict[str, str]]:
    """Messages for the template; without a system role the system text opens the first user
    message, as :meth:`ChatRenderer.messages` folds it."""
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
    if msgs[0]["role"] == "system" and not renderer.supports_system_role:
        system = msgs.pop(0)["content"]
        if msgs and msgs[0]["role"] == "user":
            msgs[0]["content"] = f"{system}\n\n{msgs[0]['content']}"
        else:
            msgs.insert(0, {"role": "user", "content": system})
    return msgs


def render_conversation(renderer: ChatRenderer, conv: Conversation, where: str = "conversation"
                        ) -> Rendered:
    """Tokenise ``conv`` with the chat template and find every message's content tokens."""
    text = renderer._render(_template_messages(renderer, conv), generation_prompt=False)
    enc = renderer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    spans, cursor = [], 0
    for i, m in enumerate(conv.messages):
        # templates may trim a message's surrounding white space
        needle = m.content.strip()
        at = text.find(needle, cursor)
        if at < 0:
            raise TlpersonaError(f"{where}: the chat template does not render message {i} "
                                 f"({m.role}) verbatim")
        hits = [t for t, (a, b) in enumerate(offsets) if b > at and a < at + len(needle) and b > a]
        if not hits:
            raise TlpersonaError(f"{where}: message {i} ({m.role}) maps to no token")
        spans.append(MessageSpan(m.role, hits[0], hits[-1] + 1))
        cursor = at + len(needle)
    return Rendered(ids, spans)


class TokenReader:
    """Reads ``blocks.{l}.hook_resid_post`` at every token of whole sequences."""

    def __init__(self, model: LoadedModel, layers: Sequence[int], batch_size: int | None = None):
        self.model = model
        self.layers = list(layers)
        n = model.info.n_layers
        check_layers(self.layers, n)
        self._names = {f"blocks.{layer}.hook_resid_post": i for i, layer in enumerate(self.layers)}
        # nothing after the last requested block changes what is read: stop there
        top = max(self.layers) + 1
        self._stop_at = top if top < n else None
        self._stop_hooks = ([("ln_final.hook_in", stop_forward)]
                            if top >= n and "ln_final.hook_in" in model.bridge.hook_dict else [])
        self._pad = pad_id(model.tokenizer)
        self.batch_size = batch_size

    @torch.no_grad()
    def _run(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """One batch: right-padded (real tokens sit at positions 0 … n-1 and never see the
        padding after them) → per sequence ``[len, layer, d_model]`` float32 on the CPU."""
        dev = self.model.device
        ids, mask = pad_batch(seqs, self._pad, "right")
        kwargs: dict[str, Any] = {"attention_mask": mask.to(dev),
                                  "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(dev)}
        if self._stop_at is not None:
            kwargs["stop_at_layer"] = self._stop_at
        names = self._names
        with self.model.bridge.hooks(fwd_hooks=self._stop_hooks):
            _, cache = self.model.bridge.run_with_cache(
                ids.to(dev), names_filter=lambda name: name in names, **kwargs)
        stacked = torch.stack([cache[name].to(dev) for name in names], dim=2).float().cpu()
        return [stacked[i, : len(s)].clone() for i, s in enumerate(seqs)]

    def residuals(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, ``[len(seq), layer, d_model]`` float32 (CPU), in the input order.

        Sequences go in length-sorted batches (``batch_size``; None: sized from free GPU memory,
        8 on the CPU); on CUDA out-of-memory the batch size is halved and the batch retried."""
        if not seqs:
            return []
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        if self.batch_size is None:
            hf = self.model.bridge.original_model
            self.batch_size = extract_batch(self.model.device, hf.config, self.model.dtype,
                                            max(len(s) for s in seqs), len(self.layers))
        out: list[torch.Tensor | None] = [None] * len(seqs)
        start = 0
        while start < len(order):
            idx = order[start:start + self.batch_size]
            try:
                got = self._run([seqs[i] for i in idx])
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise TlpersonaError("out of GPU memory even at batch size 1") from None
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                print(f"tlpersona: out of memory; batch size now {self.batch_size}", file=sys.stderr)
                continue
            for i, t in zip(idx, got, strict=True):
                out[i] = t
            start += len(idx)
        return [t for t in out if t is not None]
