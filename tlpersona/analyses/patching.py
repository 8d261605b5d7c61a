"""Cross-persona activation patching: which positions and layers carry the persona causally.

Clean run: persona X's system prompt + a question. Corrupt run: persona Y's (by default the
``assistant`` persona) + the same question. The residual stream at one named position and layer
is copied from the clean run into the corrupt run, and the corrupt run's next-token distribution
at the last prompt token (and at teacher-forced tokens of X's own greedy response, if asked) is
compared with the clean one.

Positions are aligned by name, not index: ``sys_end`` of X goes into ``sys_end`` of Y even when
the system prompts differ in length. ``sys_start+i`` rows are the system-text tokens; a row is
defined for a pair only where both system texts have token ``i``. Where the clean and corrupt
tokens agree up to and including a position at the same index (a shared "You are a" prefix),
its activations are identical in both runs and the patch is exactly a no-op; such cells take the
corrupt run's values without a forward pass.

Metrics, each 0 = corrupt and 1 = clean, aggregated as a ratio of sums over all (pair, question)
examples where the cell is defined (stable when one example has a tiny denominator):

* KL: ``1 - sum KL(clean || patched) / sum KL(clean || corrupt)``
* logit difference: with ``t_c``/``t_y`` the clean/corrupt top tokens at each read position and
  ``LD = logit[t_c] - logit[t_y]``, ``sum(LD_patched - LD_corrupt) / sum(LD_clean - LD_corrupt)``.

TransformerLens's ``patching.generic_activation_patch`` runs one unbatched forward per cell and
indexes clean and corrupt by the same position; here clean and corrupt differ in length and the
cells of an example run as rows of batched forwards (about 2.5x faster per cell on a CPU), so
the loop is our own; the hooks are TransformerLens's (``run_with_cache``, ``run_with_hooks``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from tlpersona.analyses.interventions import Conversation, Runner, hook_name, kl
from tlpersona.data import Persona, Question, system_prompt
from tlpersona.errors import TlpersonaError
from tlpersona.models import check_layers
from tlpersona.positions import parse_position

DEFAULT_POSITIONS = ("system", "sys_end", "sys_end+1", "user_end", "last")


@dataclass
class PatchConfig:
    """``positions``: names in the position grammar (single tokens), ``system`` for every
    system-text token (``sys_start+0``, ``sys_start+1`` …) or ``all`` for every token (equal-length
    prompts only). ``corrupt``: a persona name, or ``next`` to pair each persona with the next
    one in the list."""

    layers: list[int]
    positions: list[str] = field(default_factory=lambda: list(DEFAULT_POSITIONS))
    hook: str = "resid_post"
    corrupt: str = "assistant"
    response_tokens: int = 0
    prompt_index: int = 0
    max_rows: int = 32
    skip_noops: bool = True
    progress: bool = True


@dataclass
class Cell:
    position: str
    layer: int
    kl_patched: float = 0.0
    kl_corrupt: float = 0.0
    ld_gain: float = 0.0  # sum of LD_patched - LD_corrupt
    ld_range: float = 0.0  # sum of LD_clean - LD_corrupt
    n: int = 0

    def add(self, kl_p: float, kl_y: float, gain: float, rng: float) -> None:
        self.kl_patched += kl_p
        self.kl_corrupt += kl_y
        self.ld_gain += gain
        self.ld_range += rng
        self.n += 1

    @property
    def kl_effect(self) -> float:
        return 1.0 - self.kl_patched / self.kl_corrupt if self.kl_corrupt > 0 else float("nan")

    @property
    def ld_effect(self) -> float:
        return self.ld_gain / self.ld_range if self.ld_range > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"position": self.position, "layer": self.layer, "kl_effect": self.kl_effect,
                "ld_effect": self.ld_effect, "n": self.n}


def pairs(personas: list[Persona], corrupt: str) -> list[tuple[Persona, Persona]]:
    """(clean, corrupt) persona pairs."""
    if corrupt == "next":
        if len(personas) < 2:
            raise TlpersonaError("`corrupt` next needs at least two personas")
        return [(p, personas[(i + 1) % len(personas)]) for i, p in enumerate(personas)]
    by_name = {p.name: p for p in personas}
    if corrupt not in by_name:
        raise TlpersonaError(f"corrupt persona {corrupt!r} is not among the personas")
    return [(p, by_name[corrupt]) for p in personas if p.name != corrupt]


def _system_len(conv: Conversation) -> int:
    return conv.spans.anchors["sys_last"] - conv.spans.anchors["sys_start"] + 1


def expand_positions(names: list[str], clean: list[Conversation]) -> list[str]:
    """Row names: ``system`` becomes ``sys_start+0 … sys_start+(n-1)`` for the longest system
    text among the clean runs; every other name is checked against the grammar."""
    rows: list[str] = []
    for name in names:
        if name == "system":
            longest = max(_system_len(c) for c in clean)
            rows.extend(f"sys_start+{i}" if i else "sys_start" for i in range(longest))
        elif name == "all":
            rows.append("all")
        else:
            pos = parse_position(name)
            if pos.kind != "anchored":
                raise TlpersonaError(f"patching needs single-token positions, not {pos.name}")
            rows.append(pos.name)
    return list(dict.fromkeys(rows))


def _align(name: str, clean: Conversation, corrupt: Conversation) -> list[tuple[int, int]] | None:
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


def _noop(idx: list[tuple[int, int]], clean: Conversation, corrupt: Conversation) -> bool:
    """A patch copies identical activations when every index pair is the same position and the
    token prefixes up to it agree (a causal model's activation there depends on nothing else)."""
    return all(k == c and clean.ids[: k + 1] == corrupt.ids[: c + 1] for k, c in idx)


def _logit_diff(lp: torch.Tensor, tc: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """``[..., read, vocab]`` → ``[...]``: summed over read positions."""
    at_c = lp.gather(-1, tc.expand(*lp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    at_y = lp.gather(-1, ty.expand(*lp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (at_c - at_y).sum(-1)


def patch_example(runner: Runner, clean: Conversation, corrupt: Conversation,
                  rows: list[str], cfg: PatchConfig) -> dict[tuple[str, int], tuple[float, ...]]:
    """Every (row, layer) cell for one example: ``(KL_patched, KL_corrupt, LD gain, LD range)``.

    ``clean`` and ``corrupt`` carry the same teacher-forced tokens after their prompts. Cells
    run as rows of batched corrupt forwards; the hook at each layer patches only its own rows.
    """
    lp_c = runner.logprobs(clean.ids, clean.read)[0]  # [read, vocab]
    lp_y = runner.logprobs(corrupt.ids, corrupt.read)[0]
    tc, ty = lp_c.argmax(-1), lp_y.argmax(-1)
    kl_y = float(kl(lp_c, lp_y).sum())
    ld_c = float(_logit_diff(lp_c, tc, ty))
    ld_y = float(_logit_diff(lp_y, tc, ty))
    names = {layer: hook_name(cfg.hook, layer) for layer in cfg.layers}
    acts = runner.cache(clean.ids, list(names.values()))
    out: dict[tuple[str, int], tuple[float, ...]] = {}
    todo: list[tuple[str, int, list[tuple[int, int]]]] = []
    for row in rows:
        idx = _align(row, clean, corrupt)
        if idx is None:
            continue
        for layer in cfg.layers:
            if cfg.skip_noops and _noop(idx, clean, corrupt):
                out[row, layer] = (kl_y, kl_y, 0.0, ld_c - ld_y)
            else:
                todo.append((row, layer, idx))
    for start in range(0, len(todo), runner.max_rows):
        chunk = todo[start:start + runner.max_rows]
        hooks = []
        for layer, name in names.items():
            mine = [(r, idx) for r, (_, lay, idx) in enumerate(chunk) if lay == layer]
            if mine:
                hooks.append((name, _patcher(mine, acts[name])))
        lp = runner.logprobs(corrupt.ids, corrupt.read, rows=len(chunk), hooks=hooks)
        kl_p = kl(lp_c, lp).sum(-1)
        ld_p = _logit_diff(lp, tc, ty)
        for i, (row, layer, _) in enumerate(chunk):
            out[row, layer] = (float(kl_p[i]), kl_y, float(ld_p[i]) - ld_y, ld_c - ld_y)
    return out


def _patcher(rows: list[tuple[int, list[tuple[int, int]]]], clean: torch.Tensor) -> Any:
    """Hook writing the clean activations (``[seq, d]``) into each (batch row, index pairs)."""
    b = torch.tensor([r for r, idx in rows for _ in idx])
    k = torch.tensor([i for _, idx in rows for i, _ in idx])
    c = torch.tensor([j for _, idx in rows for _, j in idx])
    src = clean[k]

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act[b.to(act.device), c.to(act.device)] = src.to(act.dtype)
        return act

    return fn


def run_patching(runner: Runner, personas: list[Persona], questions: list[Question],
                 cfg: PatchConfig) -> dict[str, Any]:
    """Grid of positions × layers averaged over persona pairs and questions (see module doc)."""
    if not cfg.layers:
        raise TlpersonaError("no layers to patch")
    check_layers(cfg.layers, runner.model.info.n_layers)
    if cfg.response_tokens < 0:
        raise TlpersonaError("`response_tokens` must be at least 0")
    plist = pairs(personas, cfg.corrupt)
    if not plist or not questions:
        raise TlpersonaError("patching needs at least one persona pair and one question")

    def system(p: Persona) -> str:
        return system_prompt(p, cfg.prompt_index)

    jobs = [(x, y, q) for x, y in plist for q in questions]
    responses = runner.greedy([runner.conversation(system(x), q.text).ids for x, _, q in jobs],
                              cfg.response_tokens)
    # (clean, corrupt), both followed by the clean persona's own response tokens
    examples = [(runner.conversation(system(x), q.text, resp),
                 runner.conversation(system(y), q.text, resp))
                for (x, y, q), resp in zip(jobs, responses, strict=True)]
    rows = expand_positions(cfg.positions, [clean for clean, _ in examples])
    cells = {(r, la): Cell(r, la) for r in rows for la in cfg.layers}
    kl_base = []
    for clean, corrupt in tqdm(examples, desc="patching", unit="example",
                               disable=not cfg.progress):
        got = patch_example(runner, clean, corrupt, rows, cfg)
        for key, vals in got.items():
            cells[key].add(*vals)
        kl_base.append(next(iter(got.values()))[1] if got else float("nan"))
    order = [c for c in cells.values() if c.n > 0]
    return {
        "config": asdict(cfg),
        "pairs": [[x.name, y.name] for x, y in plist],
        "questions": [q.id for q in questions],
        "positions": [r for r in rows if any(c.position == r for c in order)],
        "layers": list(cfg.layers),
        "kl_clean_corrupt_mean": float(torch.tensor(kl_base).nanmean()) if kl_base else None,
        "cells": [c.summary() for c in order],
    }
