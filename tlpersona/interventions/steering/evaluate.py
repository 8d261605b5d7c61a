"""The evaluator every phase of a steering run works through: the sequences (prompts with
teacher-forced responses), the unedited reference distributions, the layers' typical residual
norms, the directions (own vectors, random directions, the base persona's axis), and the edited
rows, planned once per (sequence, edit) and run in batches; per example, the KL and log-prob
values an effect is made of."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tlpersona.cache.source import ActivationSource
from tlpersona.cache.vectors import axis, centred
from tlpersona.chat.template import Spans
from tlpersona.data import Persona, Question, system_prompt
from tlpersona.interventions.runner import Runner
from tlpersona.interventions.selection import default_recipes
from tlpersona.interventions.steering.batch import Edit, Row, run_rows
from tlpersona.interventions.steering.config import Setting, SteerConfig
from tlpersona.runtime.edits import unit


def random_directions(d: int, k: int, seed: int, layer: int) -> torch.Tensor:
    """``[k, d]`` seeded Gaussian directions of unit length, one set per (seed, layer)."""
    g = torch.Generator().manual_seed(seed * 100_003 + layer)
    return unit(torch.randn(k, d, generator=g, dtype=torch.float64)).float()


class Plan:
    """Rows to run, deduplicated by (sequence, edit) key; results by key."""

    def __init__(self) -> None:
        self.rows: dict[tuple, Row] = {}
        self.meta: dict[tuple, tuple | None] = {}

    def add(self, key: tuple, row: Row, ref: tuple | None) -> None:
        if key not in self.rows:
            self.rows[key] = row
            self.meta[key] = ref


class Evaluator:
    def __init__(self, runner: Runner, store: ActivationSource, cfg: SteerConfig, targets: list[Persona],
                 base: Persona, questions: list[Question]):
        self.runner, self.store, self.cfg = runner, store, cfg
        self.targets, self.base, self.questions = targets, base, questions
        self.recipes = cfg.recipes or default_recipes(store)
        self.layers = cfg.layers or list(store.layers)
        self.results: dict[tuple, tuple[float, float]] = {}  # key -> (kl, lp)
        self.refs: dict[tuple, torch.Tensor] = {}
        self.norm: dict[int, float] = {}

    def prompt(self, p: Persona) -> str:
        return system_prompt(p, self.cfg.prompt_index)

    # -- sequences ------------------------------------------------------------------------------

    def build(self) -> None:
        r, cfg = self.runner, self.cfg
        ps = [self.base, *self.targets]
        convs = [(p, q, r.conversation(self.prompt(p), q.text)) for p in ps for q in self.questions]
        resp = r.greedy([c.ids for *_, c in convs], cfg.response_tokens)
        self.resp = {(p.name, q.id): ids for (p, q, _), ids in zip(convs, resp, strict=True)}
        self.seq: dict[tuple, Any] = {}
        for q in self.questions:
            r0 = self.resp[self.base.name, q.id]
            self.seq["A0", q.id] = r.conversation(self.prompt(self.base), q.text, r0)
            for p in self.targets:
                rx = self.resp[p.name, q.id]
                self.seq["A", p.name, q.id] = r.conversation(self.prompt(self.base), q.text, rx)
                self.seq["B", p.name, q.id] = r.conversation(self.prompt(p), q.text, rx)
                self.seq["B0", p.name, q.id] = r.conversation(self.prompt(p), q.text, r0)
        a0 = self.seq["A0", self.questions[0].id]
        self.steer_start = after_system(a0.spans)
        self.prefix = a0.ids[:self.steer_start]

    def unedited(self) -> None:
        """Reference log-probs (kept for the KL sequences) and unedited KL / log-prob values."""
        keys = list(self.seq)
        rows = [Row(self.seq[k].ids, self.seq[k].read) for k in keys]
        lps: dict[tuple, torch.Tensor] = {}
        for i, lp in run_rows(self.runner, rows, self.cfg.max_rows, self.prefix):
            lps[keys[i]] = lp
        for k in keys:
            if k[0] in ("A", "B"):
                self.refs[k] = lps[k].float()
        self.lp0 = {k: target_logprob(lps[k], self.seq[k].ids, self.seq[k].read) for k in keys}
        self.kl0 = {}
        for p in self.targets:
            for q in self.questions:
                a, b = ("A", p.name, q.id), ("B", p.name, q.id)
                self.kl0[a] = float(_kl(lps[b], lps[a]).mean())  # add: goal P_X, edited: base
                self.kl0[b] = float(_kl(lps[a], lps[b]).mean())  # removals: goal P_base

    def typical_norms(self, questions: list[Question]) -> dict[int, float]:
        from tlpersona.interventions.runner import hook_name

        norms: dict[int, list[torch.Tensor]] = {la: [] for la in self.layers}
        for q in questions:
            conv = self.seq["A0", q.id]
            acts = self.runner.cache(conv.ids, [hook_name("resid_post", la) for la in self.layers])
            for la in self.layers:
                norms[la].append(acts[hook_name("resid_post", la)][self.steer_start:].norm(dim=-1))
        return {la: float(torch.cat(v).median()) for la, v in norms.items()}

    def directions(self) -> None:
        st, cfg = self.store, self.cfg
        tidx = [st.personas.index(p.name) for p in self.targets]
        b = st.personas.index(self.base.name)
        d = self.runner.model.info.d_model
        self.own: dict[tuple[str, int], torch.Tensor] = {}  # [target, d] unit
        self.axis: dict[tuple[str, int], torch.Tensor] = {}  # [d]
        self.cent: dict[tuple[str, int], torch.Tensor] = {}
        for r in self.recipes:
            cent = st.centroids(r)
            for la in self.layers:
                c = cent[:, st.layer_index(la)]
                self.cent[r, la] = c
                self.own[r, la] = persona_directions(c, tidx)
                self.axis[r, la] = unit(axis(c, b)).float()
        self.rand = {la: random_directions(d, cfg.n_random, cfg.seed, la) for la in self.layers}

    def tau(self, recipe: str, layer: int, u: torch.Tensor, pct: float) -> float:
        proj = (self.cent[recipe, layer].double() @ u.double()).numpy()
        return float(np.percentile(proj, pct))

    # -- rows -----------------------------------------------------------------------------------

    def edits(self, s: Setting, recipe: str, direction: tuple, seq_key: tuple) -> list[Edit]:
        """Edits of one row. ``direction``: ("persona", i) a target's vector, ("random", k)."""
        out = []
        for la in s.layers:
            kind, i = direction
            if s.operator == "cap":
                u = self.axis[recipe, la] if kind == "persona" else self.rand[la][i]
            else:
                u = self.own[recipe, la][i] if kind == "persona" else self.rand[la][i]
            if s.operator == "add":
                out.append(Edit(la, self.steer_start, delta=added_vector(s.strength, self.norm[la], u)))
            else:
                start = self.seq[seq_key].spans.anchors["sys_start"]
                lo = 0.0 if s.operator == "ablate" else self.tau(recipe, la, u, s.strength)
                out.append(Edit(la, start, u=u, lo=lo, hi=0.0 if s.operator == "ablate" else math.inf))
        return out

    def plan_row(self, plan: Plan, s: Setting, recipe: str, direction: tuple, target: int,
                 q: Question, fluency: bool) -> tuple:
        """Plan one row (once) and return its key."""
        p = self.targets[target].name
        main = ("A", p, q.id) if s.operator == "add" else ("B", p, q.id)
        seq_key = (("A0", q.id) if s.operator == "add" else ("B0", p, q.id)) if fluency else main
        # a random direction's edit does not depend on the recipe, except a cap's threshold
        dkey = (recipe if direction[0] == "persona" or s.operator == "cap" else None, direction)
        key = (seq_key, s.operator, s.layers, s.strength, dkey)
        if key not in plan.rows:
            conv = self.seq[seq_key]
            plan.add(key, Row(conv.ids, conv.read, self.edits(s, recipe, direction, seq_key)),
                     None if fluency else main)
        return key

    def run(self, plan: Plan, desc: str) -> None:
        todo = [k for k in plan.rows if k not in self.results]
        rows = [plan.rows[k] for k in todo]
        bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not self.cfg.progress)
        for i, lp in run_rows(self.runner, rows, self.cfg.max_rows, self.prefix):
            k = todo[i]
            ref = plan.meta[k]
            kl = float(_kl(self.refs[_goal(ref)].double(), lp).mean()) if ref else float("nan")
            self.results[k] = (kl, target_logprob(lp, plan.rows[k].ids, plan.rows[k].read))
            bar.update(1)
        bar.close()

    # -- per-example values ---------------------------------------------------------------------

    def values(self, s: Setting, recipe: str, direction: tuple, target: int, q: Question,
               plan: Plan, fluency: bool = False) -> tuple[float, float, float, float]:
        """(kl0, kl, log-prob gain toward the goal, fluency guard or nan) of a planned example."""
        p = self.targets[target].name
        main = ("A", p, q.id) if s.operator == "add" else ("B", p, q.id)
        kl, lp = self.results[self.plan_row(plan, s, recipe, direction, target, q, False)]
        gain = lp - self.lp0[main] if s.operator == "add" else self.lp0[main] - lp
        flu = float("nan")
        if fluency:
            _, lp_f = self.results[self.plan_row(plan, s, recipe, direction, target, q, True)]
            if s.operator == "add":
                # the steered base's change on r_0, against persona X's own (when it is a loss)
                ref = self.lp0["B0", p, q.id] - self.lp0["A0", q.id]
                flu = (lp_f - self.lp0["A0", q.id]) - min(ref, 0.0)
            else:
                flu = lp_f - self.lp0["B0", p, q.id]
        return self.kl0[main], kl, gain, flu


def _goal(main: tuple) -> tuple:
    """The sequence whose distributions an edited main sequence is compared with."""
    kind, p, q = main
    return ("B" if kind == "A" else "A", p, q)


def after_system(spans: Spans) -> int:
    """The first token ``add`` edits: the one after the system block (``sys_end+1``; where the
    template has no system role, after the system text, ``sys_last+1``)."""
    a = spans.anchors
    return a["sys_end"] + 1 if "sys_end" in a else a["sys_last"] + 1


def persona_directions(centroids: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``[len(rows), d]`` float32 unit vectors of the personas at ``rows`` of one recipe's
    ``[persona, d]`` centroids, each relative to the mean of every stored persona."""
    return unit(centred(centroids)[rows]).float()


def added_vector(alpha: float, typical_norm: float, u: torch.Tensor) -> torch.Tensor:
    """What ``add`` adds at strength ``alpha``: ``alpha · s_l · u``."""
    return alpha * typical_norm * u


def _kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per read position (float64)."""
    ref, other = ref.double(), other.double()
    return (ref.exp() * (ref - other)).sum(-1).clamp(min=0.0)


def target_logprob(lp: torch.Tensor, ids: list[int], read: list[int]) -> float:
    """Mean log-prob of the teacher-forced tokens (every read position but the last predicts
    the token after it)."""
    nxt = torch.tensor([ids[t + 1] for t in read[:-1]])
    if not len(nxt):
        return float("nan")
    return float(lp[:-1].gather(-1, nxt[:, None]).mean())


def own_directions(ev: Evaluator) -> list[tuple[str, int]]:
    """The targets' own vectors as directions, one per target."""
    return [("persona", i) for i in range(len(ev.targets))]


def kl_effect(v: np.ndarray) -> float:
    """1 - ΣKL(goal || edited) / ΣKL(goal || unedited) over ``v`` ``[..., 4]``'s examples."""
    return float(1 - v[..., 1].sum() / v[..., 0].sum())
