"""Steered greedy continuations, an illustration beside the scores: the base persona's reply,
the base steered with the best ``add`` recipe, steered with a random direction of equal norm,
and the persona's own reply, each with its fluency under the unsteered base."""

from __future__ import annotations

import torch

from tlpersona.data import Question
from tlpersona.interventions.runner import Runner
from tlpersona.interventions.steering.batch import Edit, Row, row_edits, run_rows
from tlpersona.interventions.steering.evaluate import Evaluator, target_logprob
from tlpersona.interventions.steering.result import Continuation, SteeringResult


@torch.no_grad()
def steered_greedy(runner: Runner, prompts: list[list[int]], edits: list[list[Edit]], n: int
                   ) -> list[list[int]]:
    """Greedy continuations (end-of-turn token dropped), row ``b`` of ``prompts[b]`` with
    ``edits[b]``, in one batch of the static-cache decoder on the bridge's HF model: the edits
    cover the prompt from their start and every generated token, as in an uncached edited
    forward of the whole sequence."""
    from tlpersona.runtime.decode import StaticGreedy

    hf = runner.bridge.original_model
    dec = StaticGreedy(hf, n, runner.eos, runner.pad)
    steer = row_edits(edits, hf.config.hidden_size)
    return [[t for t in ids if t not in runner.eos] for ids in dec(prompts, steer or None)]


def greedy_continuations(ev: Evaluator, result: SteeringResult, question: Question) -> list[Continuation]:
    """Greedy continuations, as an illustration, with the ``add`` recipe of the largest
    selection-question effect at its selected setting: unsteered
    base, steered, a random direction of equal norm, and the persona itself; each text's mean
    per-token log-prob under the unsteered base model (the fluency of what was generated)."""
    # picked on the selection questions (never on the scoring ones it is shown with)
    best = max(result.scores_for("add"), key=lambda x: x.selection_effect)
    r, s = best.recipe, best.setting
    tok = ev.runner.model.tokenizer
    conv = ev.runner.conversation(ev.prompt(ev.base), question.text)
    n = ev.cfg.continuation_tokens
    targets = ev.targets[: ev.cfg.continuations]
    seq = ("A0", question.id)
    # one batch: base, random direction, then each target steered and each target itself
    prompts = [conv.ids] * (2 + len(targets)) + [
        ev.runner.conversation(ev.prompt(p), question.text).ids for p in targets]
    edits = [[], ev.edits(s, r, ("random", 0), seq),
             *[ev.edits(s, r, ("persona", i), seq) for i in range(len(targets))],
             *[[] for _ in targets]]
    gen = steered_greedy(ev.runner, prompts, edits, n)
    plain, rand = gen[0], gen[1]
    out = []
    for i, p in enumerate(targets):
        steered, own = gen[2 + i], gen[2 + len(targets) + i]
        texts = {"base": plain, "steered": steered, "random": rand, "persona_itself": own}
        rows = [Row(conv.ids + t, list(range(len(conv.ids) - 1, len(conv.ids) + len(t))))
                for t in texts.values()]
        lps = dict(run_rows(ev.runner, rows, len(rows)))
        fl = {k: target_logprob(lps[i_], rows[i_].ids, rows[i_].read)
              for i_, k in enumerate(texts)}
        out.append(Continuation(p.name, question.text, r, s.label(), tok.decode(plain),
                                tok.decode(steered), tok.decode(rand), tok.decode(own), fl))
    return out
