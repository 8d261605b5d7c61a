"""(system, user) prompt pairs from a JSONL file of chat messages: the new material
:func:`tlpersona.project` reads at a prompt position. Multi-turn conversations, whose assistant
turns a trajectory follows, are read by :func:`tlpersona.load_conversations`."""

from __future__ import annotations

import json
from pathlib import Path

from tlpersona.errors import TlpersonaError
from tlpersona.infra.reading import jsonl_lines, read_text


def load_system_user_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(system, user) of every line of a JSONL file of chat messages: each line a list of
    messages (``role``, ``content``) or an object whose ``messages`` is one, holding a system
    and a user message (the first of each is taken). Blank lines are skipped; a line without
    both is one error naming ``path:line``."""
    out = []
    for n, line in enumerate(jsonl_lines(read_text(Path(path), "conversations JSONL file")), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)
            msgs = msgs["messages"] if isinstance(msgs, dict) else msgs
            system = next(m["content"] for m in msgs if m["role"] == "system")
            user = next(m["content"] for m in msgs if m["role"] == "user")
        except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
            raise TlpersonaError(f"{path}:{n}: expected a list of chat messages with a system "
                                 "and a user message") from None
        out.append((system, user))
    return out
