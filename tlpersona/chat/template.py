"""The only module that touches chat templates.

A conversation is rendered with the tokenizer's own template and tokenised once; each turn's token
span is found from character offsets of the message contents inside the rendered text, so no
model-name switches are needed. Templates without a system role (Gemma style) fold the system text
into the user turn: the system text is still located, but ``sys_end`` does not exist there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from tlpersona.errors import TlpersonaError


@dataclass
class Spans:
    """Token indices of one conversation (prompt, optionally followed by a response).

    Every index refers to ``ids``; ``prompt_len`` counts the prompt tokens with the generation
    prompt, and the response (if any) fills ``ids[prompt_len:]``.
    """

    ids: list[int]
    prompt_len: int
    anchors: dict[str, int] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    response_stop: int | None = None
    # end of the assistant turn as the template closes it (the closing tokens follow the response)
    turn_stop: int | None = None

    @property
    def seq_len(self) -> int:
        return len(self.ids)

    @property
    def response(self) -> tuple[int, int]:
        stop = self.response_stop if self.response_stop is not None else len(self.ids)
        return self.prompt_len, stop

    def anchor(self, name: str) -> int:
        if name in self.anchors:
            return self.anchors[name]
        raise TlpersonaError(self.missing.get(name, f"anchor {name} does not exist here"))


def template_hash(tokenizer: Any) -> str:
    """sha256 of the chat template text (what decides every position)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise TlpersonaError("the tokenizer has no chat template")
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    return hashlib.sha256(str(template).encode()).hexdigest()


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


class ChatRenderer:
    """Renders (system, question) conversations into token ids with named anchors."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise TlpersonaError("the tokenizer has no chat template; positions need one")
        self._special = _special_ids(tokenizer)
        self._system_role: bool | None = None
        self._close: list[int] | None = None

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # templates raise their own exception types
            raise TlpersonaError(f"chat template failed: {exc}") from exc
        return str(text)

    def messages(self, system: str, question: str) -> list[dict[str, str]]:
        """Chat messages for one conversation; the system text is folded into the user turn when
        the template has no system role."""
        if self.supports_system_role:
            return [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return [{"role": "user", "content": f"{system}\n\n{question}"}]

    @property
    def supports_system_role(self) -> bool:
        if self._system_role is None:
            probe = "q7x system probe"
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
                    tokenize=False,
                )
                self._system_role = probe in str(text)
            except Exception:  # a template that rejects the role raises
                self._system_role = False
        return self._system_role

    def prompt(self, system: str, question: str, response_ids: list[int] | None = None) -> Spans:
        """Tokenise one conversation and locate its anchors.

        ``response_ids`` (generated token ids) are appended after the generation prompt; they
        are never re-tokenised from text.
        """
        if not system.strip():
            raise TlpersonaError("empty system prompt")
        text = self._render(self.messages(system, question), generation_prompt=True)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        spans = Spans(ids=ids, prompt_len=len(ids))
        spans.anchors["last"] = len(ids) - 1

        sys_at = text.find(system)
        if sys_at < 0:
            raise TlpersonaError("the chat template does not render the system text verbatim")
        user_at = text.find(question, sys_at + len(system)) if question else -1
        sys_first, sys_last = self._token_range(offsets, sys_at, sys_at + len(system))
        spans.anchors["sys_start"], spans.anchors["sys_last"] = sys_first, sys_last
        if user_at >= 0:
            u_first, u_last = self._token_range(offsets, user_at, user_at + len(question))
            spans.anchors["user_start"], spans.anchors["user_last"] = u_first, u_last
            spans.anchors["user_end"] = self._end_of_turn(ids, u_last, len(ids))
        else:
            msg = "the chat template does not render the question verbatim"
            for name in ("user_start", "user_last", "user_end"):
                spans.missing[name] = msg
        if self.supports_system_role:
            stop = spans.anchors.get("user_start", len(ids))
            spans.anchors["sys_end"] = self._end_of_turn(ids, sys_last, stop)
        else:
            spans.missing["sys_end"] = (
                "sys_end does not exist: this chat template has no system role and folds the "
                "system prompt into the user turn (use sys_last or raw_system_last)"
            )
        if response_ids is not None:
            spans.ids = ids + list(response_ids)
            spans.anchors["resp_start"] = len(ids)
        else:
            spans.missing["resp_start"] = "resp_start needs a response"
        return spans

    def turn_close(self) -> list[int]:
        """Token ids the template writes after an assistant message's content (ChatML:
        ``<|im_end|>``, ``\n``).

        The seed experiment rendered each conversation with its response as an assistant message
        and pooled every token after the generation prompt, so its response span ends with
        these. Found by rendering a probe conversation with and without an assistant message;
        a template whose assistant turn does not continue its generation prompt, or whose closing
        text would merge into the content's last token, is refused.
        """
        if self._close is None:
            probe = "q7x closing probe"
            msgs = self.messages("You are a probe.", "Hi?")
            head = self._render(msgs, generation_prompt=True) + probe
            full = self._render([*msgs, {"role": "assistant", "content": probe}], generation_prompt=False)
            tail = full[len(head):]
            if not full.startswith(head) or not tail:
                raise TlpersonaError("response_mean_seed: this chat template does not render an "
                                     "assistant message as its generation prompt followed by the "
                                     "content and closing text")
            close = list(self.tokenizer(tail, add_special_tokens=False)["input_ids"])
            whole = list(self.tokenizer(full, add_special_tokens=False)["input_ids"])
            if whole[-len(close):] != close:
                raise TlpersonaError("response_mean_seed: this chat template's closing text "
                                     "tokenises differently after the content than alone")
            self._close = close
        return list(self._close)

    def raw_system(self, system: str) -> list[int]:
        """The system text tokenised alone: no template, no BOS."""
        if not system.strip():
            raise TlpersonaError("empty system prompt")
        return list(self.tokenizer(system, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _token_range(offsets: list[tuple[int, int]], start: int, stop: int) -> tuple[int, int]:
        hits = [i for i, (a, b) in enumerate(offsets) if b > start and a < stop and b > a]
        if not hits:
            raise TlpersonaError("could not map message text to tokens")
        return hits[0], hits[-1]

    def _end_of_turn(self, ids: list[int], content_last: int, stop: int) -> int:
        """First special token after the content (the turn's end-of-turn marker); the token just
        after the content when the template closes turns with plain text."""
        for i in range(content_last + 1, min(stop, len(ids))):
            if ids[i] in self._special:
                return i
        if content_last + 1 < len(ids):
            return content_last + 1
        raise TlpersonaError("no end-of-turn token after the message")


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    first = seqs[0]
    n = len(first)
    for seq in seqs[1:]:
        n = min(n, len(seq))
        for i in range(n):
            if seq[i] != first[i]:
                n = i
                break
    return n
