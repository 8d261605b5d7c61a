"""Steering with persona vectors: which recipe's vector actually moves the model.

For persona X, recipe R and layer l, ``v = centroid_R(X) - mean_P centroid_R(P)`` (over every
persona in the store). ``alpha * v`` is added to ``blocks.{l}.hook_resid_post`` of the base run
(by default the ``assistant`` persona with the same question) at every position after the
system block (``after_system``) or at the response tokens only (``response``). The steered
next-token distributions are compared with X's own: ``KL(P_X || P_steered)`` at the last prompt
token and at teacher-forced tokens of X's greedy response — lower is better steering. The
control adds a random direction of the same norm (one Gaussian draw per recipe, layer and
persona from a seeded generator).

Score of a recipe at a layer: ``1 - KL(best alpha) / KL(alpha = 0)`` with KL averaged over
(persona, question) examples; 0 = no better than the unsteered base, 1 = X's distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tlpersona.analyses.interventions import Runner, hook_name, kl
from tlpersona.data import Persona, Question, system_prompt
from tlpersona.errors import TlpersonaError

WHERE = ("after_system", "response")


@dataclass
class SteerConfig:
    recipes: list[str]
    layers: list[int]
    alphas: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0, 8.0])
    where: str = "after_system"
    base: str = "assistant"
    response_tokens: int = 0
    prompt_index: int = 0
    seed: int = 0
    continuations: int = 2
    continuation_tokens: int = 24
    progress: bool = True


def persona_vectors(centroids: torch.Tensor) -> torch.Tensor:
    """``[persona, d]`` centroids → ``[persona, d]`` float32 vectors minus the persona mean."""
    c = centroids.double()
    return (c - c.mean(0, keepdim=True)).float()


def random_like(vectors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Gaussian direction per row, scaled to that row's norm (``[n, d]``)."""
    g = torch.randn(vectors.shape, generator=generator, dtype=torch.float64)
    g = g / g.norm(dim=-1, keepdim=True) * vectors.double().norm(dim=-1, keepdim=True)
    return g.float()


def _start(conv: Any, where: str) -> int:
    """First steered token of a conversation."""
    return conv.spans.anchors["sys_end"] + 1 if where == "after_system" else conv.spans.prompt_len


def _adder(deltas: torch.Tensor, start: int) -> Any:
    """Hook adding ``deltas[row]`` (``[rows, d]``) at every position from ``start`` on."""
    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act[:, start:] += deltas.to(act.device, act.dtype)[:, None, :]
        return act

    return fn


def _check(cfg: SteerConfig, store: Any, personas: list[Persona]) -> None:
    if cfg.where not in WHERE:
        raise TlpersonaError(f"unknown --steer-where {cfg.where!r} (after_system or response)")
    if cfg.where == "response" and cfg.response_tokens < 1:
        raise TlpersonaError("--steer-where response needs --response-tokens of at least 1")
    if not cfg.alphas:
        raise TlpersonaError("no alphas given")
    for r in cfg.recipes:
        if r not in store.positions:
            raise TlpersonaError(f"recipe {r} is not in the store (stored: "
                                 f"{', '.join(store.positions)})")
    for layer in cfg.layers:
        store.layer_index(layer)
    missing = [p.name for p in personas if p.name not in store.personas]
    if missing:
        raise TlpersonaError(f"persona {missing[0]} is not in the store")
    if cfg.base not in store.personas:
        raise TlpersonaError(f"base persona {cfg.base!r} is not in the store")


def run_steering(runner: Runner, store: Any, personas: list[Persona], base: Persona,
                 questions: list[Question], cfg: SteerConfig) -> dict[str, Any]:
    """Sweep alpha for every recipe and layer on ``personas`` (base excluded); see module doc."""
    _check(cfg, store, personas)
    targets = [p for p in personas if p.name != base.name]
    if not targets or not questions:
        raise TlpersonaError("steering needs at least one persona besides the base and a question")
    index = [store.personas.index(p.name) for p in targets]
    gen = torch.Generator().manual_seed(cfg.seed)
    vecs: dict[tuple[str, int], torch.Tensor] = {}
    rand: dict[tuple[str, int], torch.Tensor] = {}
    for r in cfg.recipes:
        cent = store.centroids(r)
        for layer in cfg.layers:
            v = persona_vectors(cent[:, store.layer_index(layer)])[index]
            vecs[r, layer] = v
            rand[r, layer] = random_like(v, gen)
    alphas = [float(a) for a in cfg.alphas]

    def prompt(p: Persona) -> str:
        return system_prompt(p, cfg.prompt_index)

    own = [(i, q, runner.conversation(prompt(p), q.text)) for i, p in enumerate(targets)
           for q in questions]
    resp = runner.greedy([c.ids for *_, c in own], cfg.response_tokens)
    # sums over examples of KL(P_X || P): [recipe, layer, alpha, kind(vector/random)]
    kl_sum = np.zeros((len(cfg.recipes), len(cfg.layers), len(alphas), 2))
    kl_base = 0.0
    # response-only steering leaves the last prompt token as it was: read from the first
    # response token on
    lo = 0 if cfg.where == "after_system" else 1
    for (i, q, _), r_ids in tqdm(list(zip(own, resp, strict=True)), desc="steering",
                                 unit="example", disable=not cfg.progress):
        target = runner.conversation(prompt(targets[i]), q.text, r_ids)
        conv = runner.conversation(prompt(base), q.text, r_ids)
        lp_x = runner.logprobs(target.ids, target.read[lo:])[0]
        read = conv.read[lo:]
        lp_b = runner.logprobs(conv.ids, read)[0]
        k0 = float(kl(lp_x, lp_b).mean())
        kl_base += k0
        kl_sum[:, :, [j for j, a in enumerate(alphas) if a == 0.0], :] += k0
        start = _start(conv, cfg.where)
        # every steered row of this example: (recipe, layer, alpha, kind) with its delta
        todo = [(ri, li, ai, kind, a * (vecs, rand)[kind][r, layer][i])
                for ri, r in enumerate(cfg.recipes) for li, layer in enumerate(cfg.layers)
                for ai, a in enumerate(alphas) if a != 0.0 for kind in (0, 1)]
        for lo_row in range(0, len(todo), runner.max_rows):
            chunk = todo[lo_row:lo_row + runner.max_rows]
            hooks = []
            for li, layer in enumerate(cfg.layers):
                deltas = torch.zeros(len(chunk), runner.model.info.d_model)
                for j, row in enumerate(chunk):
                    if row[1] == li:
                        deltas[j] = row[4]
                if any(row[1] == li for row in chunk):
                    hooks.append((hook_name("resid_post", layer), _adder(deltas, start)))
            lp = runner.logprobs(conv.ids, read, rows=len(chunk), hooks=hooks)
            vals = kl(lp_x, lp).mean(-1)
            for j, (ri, li, ai, kind, _) in enumerate(chunk):
                kl_sum[ri, li, ai, kind] += float(vals[j])
    n = len(own)
    mean = kl_sum / n
    base_kl = kl_base / n
    table = []
    for ri, r in enumerate(cfg.recipes):
        for li, layer in enumerate(cfg.layers):
            best = int(np.argmin(mean[ri, li, :, 0]))
            best_rand = int(np.argmin(mean[ri, li, :, 1]))
            table.append({
                "recipe": r, "layer": layer, "best_alpha": alphas[best],
                "kl": mean[ri, li, best, 0], "effect": 1 - mean[ri, li, best, 0] / base_kl,
                "random_kl_same_alpha": mean[ri, li, best, 1],
                "random_effect": 1 - mean[ri, li, best_rand, 1] / base_kl,
                "norm": float(vecs[r, layer].norm(dim=-1).mean()),
            })
    ranking = []
    for r in cfg.recipes:
        rows = [t for t in table if t["recipe"] == r]
        top = max(rows, key=lambda t: t["effect"])
        ranking.append({"recipe": r, "layer": top["layer"], "alpha": top["best_alpha"],
                        "effect": top["effect"], "random_effect": top["random_effect"]})
    ranking.sort(key=lambda t: -t["effect"])
    result: dict[str, Any] = {
        "config": asdict(cfg), "base": base.name, "personas": [p.name for p in targets],
        "questions": [q.id for q in questions], "alphas": alphas, "kl_unsteered": base_kl,
        "kl": {r: {str(layer): {"vector": mean[ri, li, :, 0].tolist(),
                                "random": mean[ri, li, :, 1].tolist()}
                   for li, layer in enumerate(cfg.layers)} for ri, r in enumerate(cfg.recipes)},
        "table": table, "ranking": ranking,
    }
    result["continuations"] = continuations(runner, targets, base, questions[0], vecs, rand,
                                            ranking[0], cfg) if cfg.continuations else []
    return result


@torch.no_grad()
def steered_greedy(runner: Runner, ids: list[int], start: int, layer: int,
                   deltas: torch.Tensor, n: int) -> list[list[int]]:
    """Greedy continuations of one prompt, one row per steering delta (``[rows, d]``); the
    delta is added from ``start`` on, generated tokens included. No KV cache: every step reruns
    the whole sequence through the hooked model, so what is generated is exactly what the
    steered forward pass predicts."""
    rows = len(deltas)
    seqs = [list(ids) for _ in range(rows)]
    done = [False] * rows
    name = hook_name("resid_post", layer)
    for _ in range(n):
        x = torch.tensor(seqs, device=runner.model.device)
        logits = runner.bridge.run_with_hooks(x, fwd_hooks=[(name, _adder(deltas, start))])
        nxt = logits[:, -1].argmax(-1).tolist()
        for r in range(rows):
            seqs[r].append(nxt[r])
            done[r] = done[r] or nxt[r] in runner.eos
        if all(done):
            break
    out = []
    for s in seqs:
        gen = s[len(ids):]
        cut = next((i for i, t in enumerate(gen) if t in runner.eos), None)
        out.append(gen if cut is None else gen[:cut])
    return out


def continuations(runner: Runner, targets: list[Persona], base: Persona, question: Question,
                  vecs: dict, rand: dict, top: dict[str, Any], cfg: SteerConfig
                  ) -> list[dict[str, Any]]:
    """A few greedy continuations with the best recipe's vector at its best layer and alpha:
    unsteered base, base + alpha v, base + alpha random, and the persona itself."""

    def prompt(p: Persona) -> str:
        return system_prompt(p, cfg.prompt_index)

    r, layer, alpha = top["recipe"], top["layer"], top["alpha"]
    tok = runner.model.tokenizer
    conv = runner.conversation(prompt(base), question.text)
    start = _start(conv, "after_system")
    out = []
    for i, p in enumerate(targets[: cfg.continuations]):
        deltas = torch.stack([torch.zeros_like(vecs[r, layer][i]), alpha * vecs[r, layer][i],
                              alpha * rand[r, layer][i]])
        plain, steered, random_ = steered_greedy(runner, conv.ids, start, layer, deltas,
                                                 cfg.continuation_tokens)
        own = runner.greedy([runner.conversation(prompt(p), question.text).ids],
                            cfg.continuation_tokens)[0]
        own = [t for t in own if t not in runner.eos]
        out.append({"persona": p.name, "question": question.text, "recipe": r, "layer": layer,
                    "alpha": alpha, "base": tok.decode(plain), "steered": tok.decode(steered),
                    "random": tok.decode(random_), "persona_itself": tok.decode(own)})
    return out
