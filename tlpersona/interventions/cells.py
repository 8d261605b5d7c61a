"""One patched cell's pieces shared by exact patching and attribution: which positions a row
pairs between the clean and corrupt prompts, whether a patch would copy identical activations,
and the logit difference read at the answer."""

from __future__ import annotations

import torch

from tlpersona.chat.positions import parse_position
from tlpersona.errors import TlpersonaError
from tlpersona.interventions.runner import Conversation


def align(name: str, clean: Conversation, corrupt: Conversation) -> list[tuple[int, int]] | None:
    """(clean index, corrupt index) pairs that the row ``name`` patches, or None where the row
    does not exist for this example."""
    if name == "all":
        if len(clean.ids) != len(corrupt.ids):
            raise TlpersonaError("position 'all' needs clean and corrupt prompts of equal length")
        return [(i, i) for i in range(len(clean.ids))]
    pos = parse_position(name)
    k = pos.resolve(clean.spans)[0]
    c = pos.resolve(corrupt.spans)[0]
    if pos.anchor == "sys_start":  # system-text rows stay inside both system texts
        if k > clean.spans.anchors["sys_last"] or c > corrupt.spans.anchors["sys_last"]:
            return None
    return [(k, c)]


def noop(idx: list[tuple[int, int]], clean: Conversation, corrupt: Conversation) -> bool:
    """A patch copies identical activations when every index pair is the same position and the
    token prefixes up to it agree (a causal model's activation there depends on nothing else)."""
    return all(k == c and clean.ids[: k + 1] == corrupt.ids[: c + 1] for k, c in idx)


def logit_diff(lp: torch.Tensor, tc: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """``[..., read, vocab]`` → ``[...]``: summed over read positions."""
    at_c = lp.gather(-1, tc.expand(*lp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    at_y = lp.gather(-1, ty.expand(*lp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (at_c - at_y).sum(-1)
