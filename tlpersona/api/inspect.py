"""Looking at a chat template: where each named position lands."""

from __future__ import annotations

from collections.abc import Sequence

from tlpersona.chat.positions import parse_positions
from tlpersona.chat.template import ChatRenderer
from tlpersona.errors import TlpersonaError
from tlpersona.models.loading import load_tokenizer, resolve


def describe_positions(model: str = "default",
                       system: str = "You are a pirate captain who has spent forty years at sea.",
                       question: str = "What is the best way to spend a free afternoon?",
                       positions: Sequence[str] = ("recipes",)) -> str:
    """Text showing one templated prompt of ``model``, token by token, with each of
    ``positions`` marked on its token (pooled and response positions are described below)."""
    parsed = parse_positions(",".join(positions))
    source, _ = resolve(model)
    tok = load_tokenizer(source)
    renderer = ChatRenderer(tok)
    spans = renderer.prompt(system, question)
    marks: dict[int, list[str]] = {}
    notes = []
    for pos in parsed:
        if pos.kind == "raw":
            raw = renderer.raw_system(system)
            notes.append(f"{pos.name}: token {tok.convert_ids_to_tokens(raw[-1])!r} of the system "
                         f"text tokenised alone ({len(raw)} tokens, no template)")
            continue
        if pos.needs_response:
            notes.append(f"{pos.name}: needs a generated response (after token {spans.prompt_len - 1})")
            continue
        try:
            start, stop = pos.resolve(spans)
        except TlpersonaError as exc:
            notes.append(f"{pos.name}: {exc}")
            continue
        if stop - start == 1:
            marks.setdefault(start, []).append(pos.name)
        else:
            notes.append(f"{pos.name}: mean over tokens {start}..{stop - 1}")
    lines = [f"template of {model} (system role: {'yes' if renderer.supports_system_role else 'no'})"]
    for i, tid in enumerate(spans.ids):
        label = "  <- " + ", ".join(marks[i]) if i in marks else ""
        lines.append(f"{i:4d}  {tok.convert_ids_to_tokens(tid)!r:24}{label}")
    lines.extend(notes)
    return "\n".join(lines)
