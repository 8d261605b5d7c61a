"""Steering, ablation and capping: the edit algebra against numpy, batched edited rows against a
plain-HF forward-hook reference, the held-out design (selection never sees the scoring
questions), the statistics on planted data, and one small run on the embedded model."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tlpersona.cli import main
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.errors import TlpersonaError
from tlpersona.interventions import steering as S
from tlpersona.interventions.runner import Runner
from tlpersona.interventions.selection import choose_personas
from tlpersona.interventions.steering.batch import Edit, Row, run_rows
from tlpersona.interventions.steering.bootstrap import Bootstrap, separated_ranks
from tlpersona.interventions.steering.config import check_config
from tlpersona.interventions.steering.evaluate import Evaluator, random_directions
from tlpersona.interventions.steering.select import split_questions
from tlpersona.interventions.steering.verdict import ANSWER_CHARS, monotonicity, random_rank_p
from tlpersona.runtime.edits import RowEdits, unit


def test_edit_algebra_matches_numpy():
    rng = np.random.default_rng(0)
    rows, seq, d = 5, 7, 6
    h = rng.normal(size=(rows, seq, d))
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    v = rng.normal(size=d)
    tau = 0.3
    ed = RowEdits.neutral(rows, d, torch.float64)
    ed.set(0, 2, delta=torch.tensor(1.5 * v))                     # add
    ed.set(1, 0, u=torch.tensor(u), lo=0.0, hi=0.0)               # ablate
    ed.set(2, 3, u=torch.tensor(u), lo=tau)                       # cap
    ed.set(3, seq)                                                 # starts after the end
    got = ed.apply(torch.tensor(h)).numpy()
    want = h.copy()
    want[0, 2:] = h[0, 2:] + 1.5 * v
    want[1] = h[1] - np.outer(h[1] @ u, u)
    p = h[2, 3:] @ u
    want[2, 3:] = h[2, 3:] + np.outer(np.maximum(tau - p, 0), u)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_array_equal(got[3:], h[3:])  # neutral rows: bit-identical
    # ablation leaves nothing along u; capping leaves nothing below tau and moves only along u
    assert np.abs(got[1] @ u).max() < 1e-12
    assert (got[2, 3:] @ u).min() >= tau - 1e-12
    resid = (got[2] - h[2]) - np.outer((got[2] - h[2]) @ u, u)
    assert np.abs(resid).max() < 1e-12


@pytest.fixture(scope="module")
def runner(loaded):
    return Runner(loaded)


def _hf_reference(hf, ids, read, edits):
    """Log-probs at ``read`` with every edit applied by a forward hook on HF's decoder layer."""
    handles = []
    for e in edits:
        def hook(module, args, out, e=e):
            h = out[0] if isinstance(out, tuple) else out
            x = h[0, e.start:].double()
            u = torch.zeros(x.shape[-1], dtype=torch.float64) if e.u is None else e.u.double()
            p = x @ u
            x = x + (0 if e.delta is None else e.delta.double()) + \
                (p.clamp(e.lo, e.hi) - p)[:, None] * u
            h[0, e.start:] = x.to(h.dtype)
            return out
        handles.append(hf.model.layers[e.layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, read]
    finally:
        for hnd in handles:
            hnd.remove()
    return torch.log_softmax(logits.double(), -1)


def test_batched_edited_rows_equal_a_hooked_hf_reference(runner, hf_ref):
    """Rows of different lengths, operators and layers in one batch (right-padded, with the
    shared system block from a KV cache) each equal their own unbatched HF run."""
    g = torch.Generator().manual_seed(0)
    base = "You are a helpful, honest assistant."
    a = runner.conversation(base, "Why is the sky blue?", [100, 200, 300])
    b = runner.conversation(base, "What should I cook tonight with rice?", [5, 6])
    c = runner.conversation("You are a pirate.", "Why is the sky blue?", [7, 8, 9, 10])
    start = a.spans.anchors["sys_end"] + 1
    u = unit(torch.randn(576, generator=g))
    rows = [
        Row(a.ids, a.read, [Edit(7, start, delta=torch.randn(576, generator=g) * 4)]),
        Row(b.ids, b.read, [Edit(7, start, delta=torch.randn(576, generator=g) * 4),
                            Edit(15, start + 2, u=u, lo=0.0, hi=0.0)]),
        Row(a.ids, a.read, []),
        Row(c.ids, c.read, [Edit(15, c.spans.anchors["sys_start"], u=u, lo=1.0)]),
        Row(c.ids, c.read, [Edit(3, 0, u=u, lo=0.0, hi=0.0), Edit(20, 1, u=-u, lo=-0.5)]),
    ]
    for prefix in (None, a.ids[:start]):
        got = dict(run_rows(runner, rows, max_rows=3, prefix=prefix))
        for i, r in enumerate(rows):
            ref = _hf_reference(hf_ref, r.ids, r.read, r.edits)
            assert (got[i] - ref).abs().max() < 2e-4, (prefix is not None, i)
    assert runner.hook_free()


def test_bootstrap_ratio_effect_and_separated_ranks_on_planted_data():
    rng = np.random.default_rng(1)
    kl0 = rng.uniform(1, 2, size=(3, 6))
    strong, weak = 0.2 * kl0, 0.9 * kl0 + rng.normal(0, 0.01, size=kl0.shape)
    boot = Bootstrap(6, 500, seed=0)
    point, draws = boot.ratio_effect(strong, kl0)
    assert point == pytest.approx(1 - strong.sum() / kl0.sum())
    # a draw with every question weight 1 is the point estimate
    np.testing.assert_allclose((1 - (np.ones(6) @ strong.sum(0)) / (np.ones(6) @ kl0.sum(0))),
                               point)
    # better on all 6 questions: exact sign-flip p = 2 / 64
    assert separated_ranks([strong.sum(0), weak.sum(0)], 0.95) == [1, 2]
    # better on half the questions, worse on the other half: no order
    same = weak + 0.05 * kl0 * np.array([1, -1] * 3)
    assert separated_ranks([weak.sum(0), same.sum(0)], 0.95) == [1, 1]
    # better on every one of 4 questions still cannot separate: the smallest p is 2 / 16
    assert separated_ranks([strong[:, :4].sum(0), weak[:, :4].sum(0)], 0.95) == [1, 1]
    # random controls: resampling directions widens the interval
    rand = np.stack([kl0 * f for f in (0.5, 0.8, 1.1, 1.4)])
    p, flat = boot.ratio_effect(rand, np.broadcast_to(kl0, rand.shape))
    _, two = boot.ratio_effect(rand, np.broadcast_to(kl0, rand.shape), boot.direction_weights(4))
    assert np.percentile(two, 97.5) - np.percentile(two, 2.5) > \
        np.percentile(flat, 97.5) - np.percentile(flat, 2.5)


def test_identical_recipes_are_rarely_ranked_apart():
    """Planted null: 7 recipes with the same law on 10 questions (question x recipe interaction,
    as between real recipes). Bootstrap-interval ranks without correction ordered them in ~70%
    of runs (~92% with the default 4 scoring questions); the family-wise rate must stay near 5%."""
    rng = np.random.default_rng(3)
    apart = 0
    for rep in range(100):
        kl0 = rng.lognormal(0, 0.5, size=(4, 10))
        kl = [(kl0 * np.exp(rng.normal(0, 0.3, size=(1, 10)) + rng.normal(0, 0.2, size=(4, 10))))
              .sum(0) for _ in range(7)]
        apart += len(set(separated_ranks(kl, 0.95, seed=rep))) > 1
    assert apart <= 10


def test_split_questions_is_seeded_and_disjoint():
    qs = builtin_questions()[:7]
    sel, score = split_questions(qs, 3)
    assert (sel, score) == split_questions(qs, 3)
    assert len(sel) == 3 and len(score) == 4
    assert not {q.id for q in sel} & {q.id for q in score}
    with pytest.raises(TlpersonaError, match="at least two questions"):
        split_questions(qs[:1], 0)


@pytest.fixture(scope="module")
def store6(loaded, tmp_path_factory):
    from tlpersona.cache import open_store
    from tlpersona.chat.positions import parse_positions
    from tlpersona.extraction import ExtractConfig, extract_to_store

    cfg = ExtractConfig(parse_positions("last,sys_end"), [7, 15], batch_size=8, progress=False)
    path = extract_to_store(loaded, cfg, builtin_personas()[:6], builtin_questions()[:3],
                            tmp_path_factory.mktemp("steer") / "s")
    return open_store(path)


def test_contrasting_personas_are_the_farthest_on_the_base_axis(store6):
    choice = choose_personas(store6, "assistant", 2, None, ["last", "sys_end"], 15)
    z = np.zeros(6)
    for r in ("last", "sys_end"):
        c = store6.centroids(r)[:, 1].double().numpy()
        axis = c[0] - c[1:].mean(0)
        proj = c @ (axis / np.linalg.norm(axis))
        z += (proj - proj.mean()) / proj.std()
    want = [store6.personas[i] for i in np.argsort(z[1:])[:2] + 1]
    assert choice.names == want and "farthest" in choice.reason
    assert choose_personas(store6, "assistant", 2, ["chef"], ["last"], 15).names == ["chef"]
    with pytest.raises(TlpersonaError, match="'nobody' is not in the store"):
        check_config(S.SteerConfig(personas=["nobody"]), store6)
    with pytest.raises(TlpersonaError, match="is the base persona"):
        check_config(S.SteerConfig(personas=["assistant"]), store6)


def _small(**kw):
    base = dict(recipes=["last", "sys_end"], layers=[15], operators=["add", "ablate", "cap"],
                alphas=[0.25, 1.0], cap_percentiles=[50.0], n_personas=2, n_random=3,
                response_tokens=3, n_boot=200, continuations=0, progress=False)
    return S.SteerConfig(**{**base, **kw})


def test_selection_never_scores_on_selection_questions(loaded, store6, monkeypatch):
    """Every row planned for selection reads only selection questions and every scored row
    only scoring questions; changing the scoring questions leaves the selected settings as they
    were; "beyond random" is the own effect's rank among the random directions'."""
    seen: dict[str, set[str]] = {}
    real_run = Evaluator.run

    def spy(self, plan, desc):
        seen.setdefault(desc, set()).update(k[0][-1] for k in plan.rows)
        return real_run(self, plan, desc)

    monkeypatch.setattr(Evaluator, "run", spy)
    qs = builtin_questions()
    results = []
    for scoring in (qs[4:6], qs[6:8]):
        monkeypatch.setattr(S, "split_questions", lambda q, seed, s=scoring: (qs[3:4], s))
        seen.clear()
        res = S.steer(store6, loaded, builtin_personas()[:6], qs[3:8], _small())
        assert seen["steering: select"] == {qs[3].id}
        assert seen["steering: score"] == {q.id for q in scoring}
        assert {e.question for s in res.scores for e in s.examples} == {q.id for q in scoring}
        results.append(res)
    a, b = results
    assert [(s.operator, s.recipe, s.setting, s.selection_effect) for s in a.scores] == \
        [(s.operator, s.recipe, s.setting, s.selection_effect) for s in b.scores]
    # beyond random, recomputed here from the examples: the own effect's rank among the random
    # directions', and the t-prediction p (scipy's one-sided two-sample t with one own value)
    from scipy import stats

    for s in a.scores:
        own = 1 - sum(e.kl for e in s.examples) / sum(e.kl0 for e in s.examples)
        want = (1 + sum(r >= own for r in s.random_effects)) / (len(s.random_effects) + 1)
        assert s.random_p == pytest.approx(want) and s.random_p >= 1 / 4
        t_p = stats.ttest_ind([own], s.random_effects, alternative="greater").pvalue
        assert s.random_t_p == pytest.approx(t_p)
        assert s.random_test_p == (s.random_t_p if s.random_test == "t" else s.random_p)
        assert s.random_p_holm >= s.random_test_p
    text = a.answer()
    assert text.startswith("add: ") and "3 random directions" in text
    assert len(text) <= ANSWER_CHARS
    s0 = a.scores[0]
    assert s0.own.n_examples == 2 * 2 and s0.random.n_examples == 2 * 2 * 3
    assert 0 <= s0.own.wrong_way <= 1 and s0.specificity is not None
    assert all(s.other is None for s in a.scores if s.operator == "cap")


def test_steer_command_writes_report_and_refuses_bad_input(store6, tmp_path):
    out = tmp_path / "st"
    args = ["steer", str(store6.root), "--out", str(out), "--recipes", "last", "--layers", "15",
            "--operators", "add", "--alphas", "0.5,1", "--n-personas", "2", "--n-questions", "2",
            "--n-random", "3", "--response-tokens", "2", "--bootstrap", "100",
            "--continuations", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output[-2000:]
    data = json.loads((out / "steering.json").read_text())
    assert data["scores"][0]["recipe"] == "last" and data["config"]["n_random"] == 3
    assert len(data["selection_questions"]) == 1 and len(data["scoring_questions"]) == 1
    assert data["continuations"][0]["steered"]
    md = (out / "steering.md").read_text()
    assert "## Steering" in md and "random dirs" in md and "wrong way" in md
    assert (out / "figures" / "steering_effects.png").stat().st_size > 1000
    assert "steering add:" in res.output
    for bad, msg in [(["--operators", "push"], "unknown operator 'push'"),
                     (["--alphas", "0,1"], "--alphas must be positive"),
                     (["--personas", "nobody"], "'nobody' is not in the store"),
                     (["--layers", "8"], "layer 8 is not in this store"),
                     (["--n-questions", "1"], "--n-questions must be at least 2")]:
        bad_out = tmp_path / "bad"
        res = CliRunner().invoke(main, [*args[:2], "--out", str(bad_out), *args[4:], *bad])
        assert res.exit_code == 2, res.output
        lines = [x for x in res.output.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and msg in lines[0], res.output
        assert not bad_out.exists()


def test_unit_and_random_directions_are_seeded_unit_vectors():
    a = random_directions(576, 10, 0, 7)
    assert torch.equal(a, random_directions(576, 10, 0, 7))
    assert not torch.allclose(a, random_directions(576, 10, 0, 15))
    np.testing.assert_allclose(a.norm(dim=-1).numpy(), 1, rtol=1e-6)
    assert math.isclose(float(unit(torch.tensor([3.0, 4.0])).norm()), 1.0, rel_tol=1e-7)


def test_first_token_is_not_a_steering_recipe():
    """Token 0 is identical in every prompt: its persona vector is zero, so it is not steered
    with by default (the experiment stores it for the sink check)."""
    from tlpersona.interventions.selection import default_recipes

    class Stored:
        positions = ["last", "first", "sys_end", "prompt_mean_no_first"]

    assert default_recipes(Stored()) == ["last", "sys_end", "prompt_mean_no_first"]


def test_random_rank_p_and_holm_decide_beyond_random():
    """The rank p counts random directions at least as large as the own effect; Holm over the
    family turns several borderline recipes into none."""
    from tlpersona.analyses.stats import holm

    rand = list(np.linspace(0.0, 0.5, 99))
    assert random_rank_p(0.9, rand) == pytest.approx(1 / 100)
    assert random_rank_p(0.5, rand) == pytest.approx(2 / 100)  # ties count against the own
    assert random_rank_p(-1.0, rand) == 1.0
    # 6 recipes at p = 0.01: Holm makes each 0.06 (not beyond at 0.05); one alone stays 0.01
    assert np.all(holm([0.01] * 6) > 0.05) and holm([0.01])[0] == pytest.approx(0.01)


def test_monotonicity_p_enumerates_every_ordering():
    import itertools

    from scipy import stats

    strength, gain = [0.03, 0.06, 0.12, 0.25, 0.5, 1.0], [0.1, 0.3, 0.2, 0.5, 0.9, 1.1]
    rho, p = monotonicity(strength, gain)
    obs = stats.spearmanr(strength, gain).statistic
    null = [stats.spearmanr(strength, perm).statistic for perm in itertools.permutations(gain)]
    assert rho == pytest.approx(obs)
    assert p == pytest.approx(np.mean([abs(x) >= abs(obs) - 1e-12 for x in null]))
    assert monotonicity(strength, gain[::-1])[1] == pytest.approx(p)  # two-sided


def test_an_ablate_verdict_beyond_random_names_its_weak_control():
    from types import SimpleNamespace

    from tlpersona.interventions.steering.verdict import _verdict

    score = SimpleNamespace(recipe="last", rank=1, beats_random=True, fluency_ok=True,
                            random_test="rank", random_skew=None,
                            setting=SimpleNamespace(label=lambda: "L3"),
                            own=SimpleNamespace(effect=SimpleNamespace(mean=0.4, n=6)))
    ablate = _verdict("ablate", [score], 500, 3, 0.05)
    assert "last (L3) beyond the random directions" in ablate and "stricter control" in ablate
    assert "stricter control" not in _verdict("add", [score], 500, 3, 0.05)
