"""Checks of a whole run before its first generation or forward pass: every persona, phrasing
and question against every position, the model's context, and (once they exist) the responses.

A problem that only one late persona has must stop a run before hours of work, not in the
middle of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from tlpersona.chat.positions import Position
from tlpersona.chat.template import ChatRenderer, common_prefix_len, template_hash
from tlpersona.data import Persona, Question, indexed_prompts
from tlpersona.data.provenance import prompt_sha
from tlpersona.data.responses import Key, Response
from tlpersona.errors import TlpersonaError

# The same two probe questions as extraction: the prefix every conversation of a persona shares
# is at most the common prefix of these two.
_PROBES = ("Zebra?", "1 + 1")


@dataclass(frozen=True)
class PromptCheck:
    """One checked conversation: its prompt length, the sequence length its positions need
    (at most ``prompt_len`` unless a response makes the sequence longer), the prompt hash and
    the template's closing tokens that ``response_mean_seed`` appends after the response
    (empty without that position)."""

    prompt_len: int
    need: int
    sha: str
    close: tuple[int, ...] = ()


_memo: dict[tuple, dict[Key, PromptCheck]] = {}


def check_prompts(tokenizer: Any, positions: list[Position], personas: list[Persona],
                  questions: list[Question], prompt_index: int | str) -> dict[Key, PromptCheck]:
    """Render every (persona, phrasing, question) prompt and resolve every prompt position in it.

    Raises one line naming the persona and question for the first problem: a phrasing index out
    of range, an anchor the template lacks, an offset outside the prompt (where no response can
    lengthen the sequence), a system-block position that reaches into the question. Results
    are remembered, so a second check of the same run costs nothing.
    """
    key = (getattr(tokenizer, "name_or_path", ""), template_hash(tokenizer), tuple(personas),
           tuple(questions), tuple(positions), prompt_index)
    if key in _memo:
        return _memo[key]
    renderer = ChatRenderer(tokenizer)
    response_run = any(p.needs_response for p in positions)
    # a template without a well-defined closing must stop the run before any generation
    close = (tuple(renderer.turn_close()) if any(p.anchor == "response_mean_seed" for p in positions)
             else ())
    invariant = [p for p in positions if p.question_invariant and p.kind == "anchored"]
    dep = [p for p in positions if not p.question_invariant and not p.needs_response]
    out: dict[Key, PromptCheck] = {}
    for persona in personas:
        for pidx, system in indexed_prompts(persona, prompt_index):
            rows = []
            for q in questions:
                where = f"persona {persona.name!r}, question {q.id!r}"
                spans = _guard(where, partial(renderer.prompt, system, q.text))
                n = spans.prompt_len
                need = n
                for p in dep:
                    if p.kind == "pooled":
                        _guard(where, partial(p.resolve, spans))
                        continue
                    idx = _guard(where, partial(spans.anchor, p.anchor)) + p.offset
                    if idx < 0 or (idx >= n and not response_run):
                        raise TlpersonaError(f"{where}: position {p.name} resolves to token {idx}, "
                                             f"outside the sequence of {n} prompt tokens")
                    need = max(need, idx + 1)
                rows.append(spans)
                out[(persona.name, pidx, q.id)] = PromptCheck(n, need, prompt_sha(spans.ids), close)
            if invariant:
                _check_invariant(renderer, persona, system, rows, invariant)
    _memo.clear()
    _memo[key] = out
    return out


def check_context(checked: dict[Key, PromptCheck], context: int | None,
                  max_new_tokens: int = 0) -> None:
    """Every prompt (plus ``max_new_tokens`` to generate, plus the closing tokens of
    ``response_mean_seed``) fits the model's ``context``."""
    if context is None:
        return
    for key, c in checked.items():
        if c.prompt_len + max_new_tokens + len(c.close) > context:
            extra = f" plus {max_new_tokens} new tokens" if max_new_tokens else ""
            extra += f" plus {len(c.close)} closing tokens" if c.close else ""
            raise TlpersonaError(f"persona {key[0]!r}, question {key[2]!r}: the prompt of "
                                 f"{c.prompt_len} tokens{extra} exceeds the model's context of "
                                 f"{context} tokens")


def _guard(where: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except TlpersonaError as exc:
        raise TlpersonaError(f"{where}: {exc}") from None


def _check_invariant(renderer: ChatRenderer, persona: Persona, system: str, rows: list,
                     invariant: list[Position]) -> None:
    """System-block positions must lie in the prefix that every question of the persona shares."""
    probes = [renderer.prompt(system, t).ids for t in _PROBES]
    shared = common_prefix_len([*probes, *(sp.ids for sp in rows)])
    for p in invariant:
        idx = _guard(f"persona {persona.name!r}", partial(p.resolve, rows[0]))[0]
        if idx >= shared:
            raise TlpersonaError(f"position {p.name} of persona {persona.name!r} reaches past the "
                                 "system block into the question; it is not question-invariant here")


def check_responses(checked: dict[Key, PromptCheck], positions: list[Position],
                    responses: dict[Key, Response], vocab_size: int, include_eot: bool,
                    where: str, context: int | None = None) -> None:
    """The responses a run will read fit it: token ids inside the vocabulary, each continuing
    this run's prompt (where the file records it), and every position inside each sequence."""
    response_run = any(p.needs_response for p in positions)
    resp_pos = [p for p in positions if p.needs_response and p.kind == "anchored"]
    for key, c in checked.items():
        r = responses.get(key)
        name = f"{where}: persona {key[0]!r}, question {key[2]!r}"
        if r is None:
            if c.need > c.prompt_len:
                raise TlpersonaError(f"{name}: has no response, and a position needs token "
                                     f"{c.need - 1} of a {c.prompt_len}-token prompt")
            continue
        if r.finished and not r.ids:
            raise TlpersonaError(f"{name}: a finished response without its end-of-turn token "
                                 "(no response ids)")
        bad = [t for t in r.ids if not 0 <= t < vocab_size]
        if bad:
            raise TlpersonaError(f"{name}: token id {bad[0]} is outside the model's vocabulary "
                                 f"of {vocab_size}")
        if r.prompt_sha is not None and r.prompt_sha != c.sha:
            raise TlpersonaError(f"{name}: the response continues a different prompt (system "
                                 "prompt, question or chat template changed)")
        total = c.prompt_len + len(r.ids)
        if context is not None and total > context:
            raise TlpersonaError(f"{name}: prompt and response ({total} tokens) exceed the "
                                 f"model's context of {context} tokens")
        if response_run and c.need > total:
            raise TlpersonaError(f"{name}: a position needs token {c.need - 1} of a "
                                 f"{total}-token sequence")
        if c.close:
            _check_closed(name, c, r, positions, include_eot, context)
        if r.content_len(include_eot) > 0:
            for p in resp_pos:
                idx = c.prompt_len + p.offset
                if not 0 <= idx < total:
                    raise TlpersonaError(f"{name}: position {p.name} resolves to token {idx}, "
                                         f"outside the sequence of {total} tokens")
    if response_run:
        _check_coverage(checked, positions, responses, include_eot, where)


def _has_row(p: Position, r: Response | None, include_eot: bool) -> bool:
    """Whether response position ``p`` has a row for response ``r`` (as the extractor decides:
    the seed span exists for an empty response too, the others need content)."""
    return r is not None and (p.anchor == "response_mean_seed" or r.content_len(include_eot) > 0)


def _check_coverage(checked: dict[Key, PromptCheck], positions: list[Position],
                    responses: dict[Key, Response], include_eot: bool, where: str) -> None:
    """Every persona has a row for every response position in at least one question: a
    persona without any would stop the run at its group, after earlier groups were written."""
    by_persona: dict[str, list[Key]] = {}
    for k in checked:
        by_persona.setdefault(k[0], []).append(k)
    for p in (p for p in positions if p.needs_response):
        for persona, keys in by_persona.items():
            if not any(_has_row(p, responses.get(k), include_eot) for k in keys):
                raise TlpersonaError(f"{where}: persona {persona!r} has no response with "
                                     f"content for any question, so {p.name} has no row")


@dataclass(frozen=True)
class Coverage:
    """How many of a run's prompts have no response line, and how many an empty one: their
    rows of the response positions are marked invalid (``Store.valid``)."""

    total: int
    missing: list[Key]
    empty: list[Key]

    def note(self, where: str) -> str | None:
        """One line saying so, None when every prompt has a response with content."""
        if not self.missing and not self.empty:
            return None
        parts = []
        if self.missing:
            k = self.missing[0]
            parts.append(f"{len(self.missing)} of {self.total} prompts have no response line "
                         f"(first: persona {k[0]!r}, question {k[2]!r})")
        if self.empty:
            parts.append(f"{len(self.empty)} an empty response")
        return f"{where}: {' and '.join(parts)}; their response rows are marked invalid"


def coverage(checked: dict[Key, PromptCheck], responses: dict[Key, Response]) -> Coverage:
    missing = [k for k in checked if k not in responses]
    empty = [k for k in checked if k in responses and responses[k].content_len(False) <= 0]
    return Coverage(len(checked), missing, empty)


def check_response_keys(where: dict[Key, str], personas: list[Persona],
                        questions: list[Question], prompt_index: int | str) -> list[Key]:
    """The response lines (``where``: each key's ``path:line``) this run does not ask for,
    before any model is loaded. Refused, naming the line and field: a persona this run lacks,
    and a question id that differs from one of this run's only in case or surrounding space
    (read as missing, it would leave that prompt without its response). Returned, to be left
    out: lines of other questions or phrasings, as in a file made for the whole study read by
    a run of part of it (``limit_questions``, one ``prompt_index``)."""
    names = {p.name for p in personas}
    qids = {q.id for q in questions}
    folded = {q.id.strip().casefold(): q.id for q in questions}
    prompts = {p.name: {k for k, _ in indexed_prompts(p, prompt_index)} for p in personas}
    outside = []
    for key, at in where.items():
        persona, pidx, qid = key
        if persona not in names:
            raise TlpersonaError(f"{at}: field persona: responses for unknown persona "
                                 f"{persona!r}, not a persona of this run")
        if qid not in qids and qid.strip().casefold() in folded:
            raise TlpersonaError(f"{at}: field question_id {qid!r} is not a question of this "
                                 f"run; did you mean {folded[qid.strip().casefold()]!r}?")
        if qid not in qids or pidx not in prompts[persona]:
            outside.append(key)
    return outside


def _check_closed(name: str, c: PromptCheck, r: Response, positions: list[Position],
                  include_eot: bool, context: int | None) -> None:
    """With ``response_mean_seed`` the sequence is prompt, response content, then the template's
    closing tokens (which replace the end token the model emitted). Refused: a sequence past the
    context, and a response ending with another end token than the template's when a position
    would read that token (``response_mean`` with ``include_eot``, a ``resp_start`` offset), since
    that position would then read the template's token instead of the generated one."""
    content = r.content_len(False)
    total = c.prompt_len + content + len(c.close)
    if context is not None and total > context:
        raise TlpersonaError(f"{name}: prompt, response and the template's closing tokens ({total} "
                             f"tokens) exceed the model's context of {context} tokens")
    if not r.finished or r.ids[-1] == c.close[0]:
        return
    readers = [p.name for p in positions if (p.anchor == "response_mean" and include_eot)
               or (p.anchor == "resp_start" and p.offset >= content)]
    if readers:
        raise TlpersonaError(f"{name}: the response ends with token {r.ids[-1]}, not the template's "
                             f"end-of-turn token {c.close[0]} that response_mean_seed puts in its "
                             f"place, and {readers[0]} reads that token; extract "
                             "response_mean_seed in a separate run")
