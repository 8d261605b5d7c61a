"""Activation patching on the embedded default model, checked against plain-HF
forward hooks and against the identities every patching method must satisfy."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tlpersona.cache.vectors import axis, centred
from tlpersona.cli import main
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.errors import TlpersonaError
from tlpersona.interventions.cells import align
from tlpersona.interventions.patching import PatchConfig, patch_example, run_patching
from tlpersona.interventions.runner import Runner, kl
from tlpersona.interventions.selection import choose_clean

Q = "What should I cook tonight?"


@pytest.fixture(scope="module")
def runner(loaded):
    return Runner(loaded)


def _effects(vals):
    kl_p, kl_y, gain, rng, _ = vals
    return 1 - kl_p / kl_y, gain / rng


def test_patching_everything_gives_clean_and_nothing_gives_corrupt(runner):
    # equal-length system prompts, so every position has a partner
    clean = runner.conversation("You are a pirate.", Q)
    corrupt = runner.conversation("You are a chef.", Q)
    assert len(clean.ids) == len(corrupt.ids) and clean.ids != corrupt.ids
    for hook in ("resid_post", "resid_pre"):
        cfg = PatchConfig(layers=[0, 12, 29], hook=hook, skip_noops=False)
        got = patch_example(runner, clean, corrupt, ["all", "sys_start"], cfg)
        for layer in cfg.layers:
            kl_e, ld_e = _effects(got["all", layer, None])
            assert got["all", layer, None][0] < 1e-8 and kl_e == pytest.approx(1, abs=1e-6)
            assert ld_e == pytest.approx(1, abs=1e-4)
            # "You" is shared: the patched activation equals the corrupt one, the hook path
            # (not the shortcut) runs here and must leave the corrupt output
            kl_e, ld_e = _effects(got["sys_start", layer, None])
            assert abs(kl_e) < 1e-5 and abs(ld_e) < 1e-4
    # the last position after the last block decides the next token alone
    got = patch_example(runner, clean, corrupt, ["last"], PatchConfig(layers=[29]))
    assert _effects(got["last", 29, None])[0] == pytest.approx(1, abs=1e-6)
    assert runner.hook_free()


def test_patched_cell_matches_plain_hf_forward_hook(runner, hf_ref):
    """One cell against an independent computation: HF's decoder layer output replaced at the
    corrupt position by the clean hidden state, KL from HF logits."""
    clean = runner.conversation("You are a pirate who sails the seven seas.", Q)
    corrupt = runner.conversation("You are a helpful assistant.", Q)
    layer, row = 10, "sys_end"
    (k, c), = align(row, clean, corrupt)
    assert k != c  # aligned by name, not index
    got = patch_example(runner, clean, corrupt, [row], PatchConfig(layers=[layer]))
    with torch.no_grad():
        hc = hf_ref(torch.tensor([clean.ids]), output_hidden_states=True)
        src = hc.hidden_states[layer + 1][0, k]

        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h[0, c] = src
            return out

        handle = hf_ref.model.layers[layer].register_forward_hook(hook)
        try:
            patched = hf_ref(torch.tensor([corrupt.ids])).logits[0, -1]
        finally:
            handle.remove()
        ref_c = torch.log_softmax(hc.logits[0, -1].double(), -1)
        ref_p = torch.log_softmax(patched.double(), -1)
    assert got[row, layer, None][0] == pytest.approx(float(kl(ref_c, ref_p)), rel=1e-3, abs=1e-6)


def test_resid_pre_of_next_layer_equals_resid_post(runner):
    clean = runner.conversation("You are a pirate who sails the seven seas.", Q)
    corrupt = runner.conversation("You are a helpful assistant.", Q)
    rows = ["sys_start+3", "last"]
    post = patch_example(runner, clean, corrupt, rows, PatchConfig(layers=[9]))
    pre = patch_example(runner, clean, corrupt, rows, PatchConfig(layers=[10], hook="resid_pre"))
    for r in rows:
        assert post[r, 9, None][0] == pytest.approx(pre[r, 10, None][0], rel=1e-5, abs=1e-9)


def test_alignment_by_name(runner):
    a = runner.conversation("You are a pirate who sails the seven seas.", Q)
    b = runner.conversation("You are a helpful assistant.", Q)
    assert align("sys_end", a, b) == [(a.spans.anchors["sys_end"], b.spans.anchors["sys_end"])]
    assert align("sys_start+9", a, b) is None  # beyond the shorter system text
    with pytest.raises(TlpersonaError, match="equal length"):
        align("all", a, b)


def test_hooks_are_removed_even_when_a_hook_fails(runner):
    conv = runner.conversation("You are a pirate.", Q)
    before = runner.logprobs(conv.ids, conv.read)

    def boom(act, hook):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        runner.logprobs(conv.ids, conv.read, hooks=[("blocks.3.hook_resid_post", boom)])
    assert runner.hook_free()
    run_patching(runner, builtin_personas()[:2], builtin_questions()[:1],
                 PatchConfig(layers=[5], positions=["sys_end", "last"], progress=False))
    assert runner.hook_free()
    assert torch.equal(runner.logprobs(conv.ids, conv.read), before)


def test_persona_vectors_are_centroids_minus_a_mean():
    c = torch.randn(5, 8, dtype=torch.float64)
    np.testing.assert_allclose(centred(c).numpy(), (c - c.mean(0)).numpy(), atol=1e-12)
    others = np.delete(c.numpy(), 2, axis=0).mean(0)
    np.testing.assert_allclose(axis(c, 2).numpy(), c[2].numpy() - others, atol=1e-12)
    # the two references differ only in scale: n / (n - 1)
    np.testing.assert_allclose(axis(c, 2).numpy(), centred(c)[2].numpy() * 5 / 4, atol=1e-12)


@pytest.fixture(scope="module")
def small_store(loaded, tmp_path_factory):
    from tlpersona.chat.positions import parse_positions
    from tlpersona.extraction import ExtractConfig, extract_to_store

    cfg = ExtractConfig(parse_positions("last,sys_end"), [7, 15], batch_size=8, progress=False)
    return extract_to_store(loaded, cfg, builtin_personas()[:5], builtin_questions()[:3],
                            tmp_path_factory.mktemp("steer") / "s")


def test_patch_command_writes_json_figures_and_report(small_store, tmp_path):
    out = tmp_path / "p"
    res = CliRunner().invoke(main, [
        "patch", "--store", str(small_store), "--out", str(out), "--n-personas", "2",
        "--n-questions", "1", "--layers", "3,15,29", "--positions", "system,sys_end,last"])
    assert res.exit_code == 0, res.output[-2000:]
    data = json.loads((out / "patch.json").read_text())["patching"]
    cells = {(c["method"], c["component"], c["position"], c["layer"]): c for c in data["cells"]}
    assert cells["exact", "resid_post", "last", 29]["kl_effect"] == pytest.approx(1, abs=1e-6)
    # shared first token: exact no-op, for both methods and every component
    assert cells["exact", "resid_post", "sys_start", 3]["kl_effect"] == 0
    for comp in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        assert cells["attribution", comp, "sys_start", 3]["kl_effect"] == 0
    assert {a["metric"] for a in data["agreement"]} == {"kl", "ld"}
    # with a store, the clean personas are the ones farthest from the corrupt persona
    assert "farthest from 'assistant'" in data["personas_note"]
    for fig in ("patching", "attribution_resid_post", "attribution_attn_out", "attribution_mlp_out",
                "attribution_head"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    md = (out / "patch.md").read_text()
    assert "### Patching" in md and "Agreement with exact" in md
    # the report picks no "largest" cell, marks the cell that is 1 by construction (the
    # residual after the last block at the read position) and states the test
    assert "Read beside the rewording control" in md
    assert "### Persona beyond the rewording control" in md and "Holm" in md
    assert "Largest KL effects" not in md and "largest |KL effect|" not in md
    row = next(line for line in md.splitlines() if line.startswith("| last |"))  # effect grid
    assert row.rstrip(" |").endswith("¹") and row.count("¹") == 1
    assert data["n_layers"] == 30
    assert "Rewording control, exact `resid_post`" in md and data["control"]
    assert "rewording control: clean = 'assistant' in its phrasing" in res.output
    assert data["rewording_test"]["n"] == 1 and data["rewording_test"]["min_p"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["--corrupt", "nobody"], "persona 'nobody' is not among the personas"),
    (["--positions", "prompt_mean"], "patching needs single-token positions"),
    (["--layers", "40"], "layer 40 is out of range"),
])
def test_patch_bad_input_is_one_line_exit_2(default_source, tmp_path, args, message):
    res = CliRunner().invoke(main, ["patch", "--out", str(tmp_path / "p"), *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "p" / "patch.json").exists()


def test_corrupt_pairs():
    from tlpersona.interventions.patching import pairs

    ps = builtin_personas()[:3]
    assert [(x.name, y.name) for x, y in pairs(ps, "next")] == [
        (ps[0].name, ps[1].name), (ps[1].name, ps[2].name), (ps[2].name, ps[0].name)]
    assert [(x.name, y.name) for x, y in pairs(ps, ps[0].name)] == [
        (ps[1].name, ps[0].name), (ps[2].name, ps[0].name)]
    with pytest.raises(TlpersonaError, match="not among the personas"):
        pairs(ps, "nobody")


def test_clean_personas_contrast_with_the_corrupt_persona(small_store):
    from tlpersona.cache.reader import open_store
    from tlpersona.interventions.selection import choose_personas, default_recipes

    small_store = open_store(small_store)
    ps = builtin_personas()[:5]
    chosen, note = choose_clean(ps, "assistant", 3, None, small_store)
    # the same choice `steer` makes: farthest from the base on its axis, at the middle layer
    ref = choose_personas(small_store, "assistant", 3, None, default_recipes(small_store), 7)
    assert [p.name for p in chosen] == ["assistant", *ref.names]
    assert ref.names != [p.name for p in ps[1:4]]  # not merely the first three of the list
    assert "farthest from 'assistant'" in note
    chosen, note = choose_clean(ps, "assistant", 2, [ps[4].name], small_store)
    assert [p.name for p in chosen] == ["assistant", ps[4].name] and "by hand" in note
    chosen, note = choose_clean(ps, "assistant", 2, None, None)
    assert [p.name for p in chosen] == [p.name for p in ps[:3]] and "first 2" in note
    with pytest.raises(TlpersonaError, match="'nobody' is not among"):
        choose_clean(ps, "assistant", 2, ["nobody"], small_store)


def test_rewording_control_is_the_grid_of_the_reworded_corrupt_persona(runner):
    """The control is computed as the main grid is: its cells equal a main grid whose clean
    personas are the corrupt persona in each of its other phrasings; it is absent, with the
    reason, where no single corrupt persona has a second phrasing. The test's fields come out of
    the same per-question numbers."""
    from tlpersona.interventions.patching import reworded

    ps, qs = builtin_personas(), builtin_questions()[:2]
    assistant = next(p for p in ps if p.name == "assistant")
    cfg = PatchConfig(layers=[3, 29], positions=["system", "last"], method="exact",
                      progress=False)
    res = run_patching(runner, [ps[1], assistant], qs, cfg)
    assert "phrasings 1, 2 instead of 0 (4 examples)" in res.control_note
    others = [reworded(assistant, 0, j) for j in (1, 2)]
    assert [o.system_prompts[0] for o in others] == list(assistant.system_prompts[1:])
    direct = run_patching(runner, [*others, assistant], qs, PatchConfig(
        layers=[3, 29], positions=["system", "last"], method="exact", control=False,
        progress=False))
    assert direct.control == [] and "off" in direct.control_note
    assert direct.rewording_test is None and "cannot separate" in direct.answer()
    got = {(c.position, c.layer): (c.kl_effect, c.ld_effect, c.n, c.kl_by_question)
           for c in res.control}
    want = {(c.position, c.layer): (c.kl_effect, c.ld_effect, c.n, c.kl_by_question)
            for c in direct.cells}
    assert got == want and got[("last", 29)][0] == pytest.approx(1, abs=1e-6)

    t = res.rewording_test
    main = {(c.position, c.layer): c for c in res.cells}
    ctl = {(c.position, c.layer): c for c in res.control}
    assert t is not None and t.n == 2 and t.exact and t.min_p == 0.25
    tested = {(c.position, c.layer) for c in t.cells}
    assert tested and len(tested) == t.n_cells
    assert ("last", 29) not in tested  # 1 by construction in both grids
    assert ("sys_start", 3) not in tested  # "You" is shared: a no-op in the persona grid
    for c in t.cells:
        x, y = main[c.position, c.layer], ctl[c.position, c.layer]
        assert not x.noop and not y.noop
        # with one pair, each question's persona effect is that example's effect
        d = np.subtract(x.kl_by_question, y.kl_by_question)
        assert c.difference == pytest.approx(d.mean()) and c.n == 2
        assert c.p == pytest.approx(_brute_force_p(d[None])[0])
    assert {r.position for r in t.regions} <= {"system text", "after the system text"}
    assert t.min_holm_cells == min(1.0, t.n_cells * 0.25)
    assert len(res.answer()) <= 220 and "2 questions" in res.answer()
    one = run_patching(runner, [ps[1], assistant], qs[:1], PatchConfig(
        layers=[3], positions=["sys_end"], method="exact", progress=False))
    c = one.cells[0]
    assert c.kl_by_question == [pytest.approx(c.kl_effect)]  # one question: the grid's value
    nxt = run_patching(runner, ps[:2], qs[:1], PatchConfig(
        layers=[3], positions=["last"], method="exact", corrupt="next", progress=False))
    assert nxt.control == [] and "no single corrupt persona" in nxt.control_note
    assert nxt.rewording_test is None


# ---- the persona-beyond-rewording test on planted data (no model) ----

def _brute_force_p(d):
    """One-sided sign-flip p of each row's mean > 0, every pattern enumerated by itertools."""
    import itertools

    d = np.asarray(d, dtype=float)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.shape[1])))
    null = d @ signs.T  # [rows, 2^n] sums
    obs = d.sum(1, keepdims=True)
    return ((null >= obs - 1e-9 * np.abs(d).sum(1, keepdims=True)).sum(1)) / signs.shape[0]


def _planted(rng, n_q, delta, n_cells=8, sd=0.15):
    """Exact cells and control cells with per-question KL effects: half of the cells system-text
    rows, half after the system text; a shared per-cell level and per-question offset (the same
    question in both grids), independent noise of ``sd`` per grid, and ``delta`` (``[cells]``)
    added to the persona grid. Sizes from the default model: per-question differences of the
    carrying system-text cells 0.1–1, with a spread of 0.05–0.3 between questions."""
    from tlpersona.interventions.patching import CellEffect

    rows = [f"sys_start+{3 + i}" for i in range(n_cells // 2)] + [
        ["sys_end", "sys_end+1", "user_end", "last"][i % 4] for i in range(n_cells // 2)]
    level = rng.uniform(0, 0.6, n_cells)[:, None] + rng.normal(0, 0.1, (1, n_q))
    x = level + rng.normal(0, sd, (n_cells, n_q)) + np.asarray(delta, float)[:, None]
    y = level + rng.normal(0, sd, (n_cells, n_q))

    def cells(v):
        return [CellEffect("exact", "resid_post", r, i, None, float(v[i].mean()), float("nan"),
                           n_q, False, [float(e) for e in v[i]]) for i, r in enumerate(rows)]

    return cells(x), cells(y)


def _test(cells, control, alpha=0.05):
    from tlpersona.interventions.patching import beyond_rewording

    return beyond_rewording(cells, control, alpha, lambda c: False, 3, 2)


def test_sign_flip_p_is_the_brute_force_enumeration():
    from tlpersona.interventions.patching import sign_flip_greater

    rng = np.random.default_rng(1)
    d = np.vstack([rng.normal(0.2, 1, (6, 9)), rng.integers(-2, 3, (4, 9)).astype(float),
                   np.zeros((1, 9))])  # ties, and a row of zeros (p = 1)
    p, exact = sign_flip_greater(d)
    assert exact
    np.testing.assert_allclose(p, _brute_force_p(d), rtol=0, atol=1e-12)
    assert p[-1] == 1.0 and sign_flip_greater(np.ones((1, 9)))[0][0] == 2.0 ** -9
    one = np.array([[0.3], [-0.3], [0.0]])  # one question: two patterns
    np.testing.assert_allclose(sign_flip_greater(one)[0], _brute_force_p(one))
    # beyond 16 questions: random patterns, within Monte Carlo error of the exact p
    d = rng.normal(0.15, 1, (3, 18))
    p, exact = sign_flip_greater(d, n_draws=9999)
    want = _brute_force_p(d)
    assert not exact
    assert np.all(np.abs(p - want) <= 4 * np.sqrt(want * (1 - want) / 9999) + 1e-4)


def test_beyond_rewording_is_the_sign_flip_of_paired_question_differences():
    from tlpersona.analyses.stats import holm

    rng = np.random.default_rng(2)
    cells, control = _planted(rng, 7, [0.3] * 4 + [0.0] * 4)
    t = _test(cells, control)
    d = np.array([np.subtract(c.kl_by_question, k.kl_by_question) for c, k in
                  zip(cells, control, strict=True)])
    np.testing.assert_allclose([c.p for c in t.cells], _brute_force_p(d), atol=1e-12)
    region_d = np.vstack([d[:4].mean(0), d[4:].mean(0)])
    assert [r.position for r in t.regions] == ["system text", "after the system text"]
    np.testing.assert_allclose([r.p for r in t.regions], _brute_force_p(region_d), atol=1e-12)
    # one Holm family: the 8 cells and the 2 regions built from them
    joint = holm(np.concatenate([_brute_force_p(d), _brute_force_p(region_d)]))
    np.testing.assert_allclose([c.p_holm for c in t.cells], joint[:8], atol=1e-12)
    np.testing.assert_allclose([r.p_holm for r in t.regions], joint[8:], atol=1e-12)
    assert t.n_cells == 8 and t.min_p == 2.0 ** -7
    assert t.min_holm_cells == t.min_holm_regions == 10 / 128
    assert t.questions_for_cells == t.questions_for_regions == 8  # 10/2^8 ≤ 0.05 < 10/2^7
    # a no-op in either grid, or a cell trivial by construction, is not in the family
    control[0].noop = True
    assert _test(cells, control).n_cells == 7
    from tlpersona.interventions.patching import beyond_rewording

    assert beyond_rewording(cells, control, 0.05, lambda c: c.position == "last", 3, 2).n_cells == 6


def test_rewording_test_holds_its_level_when_the_persona_is_a_rewording():
    """Calibration: persona and control effects exchangeable at every question. The
    familywise false-positive rate of the one family (cells and regions) stays at most alpha
    + 3 Monte Carlo SE."""
    rng = np.random.default_rng(3)
    reps, hits_cells, hits_regions, hits_any = 1000, 0, 0, 0
    for _ in range(reps):
        t = _test(*_planted(rng, 10, np.zeros(8)))
        hits_cells += any(c.carries for c in t.cells)
        hits_regions += any(r.carries for r in t.regions)
        hits_any += any(c.carries for c in t.cells) or any(r.carries for r in t.regions)
    bound = 0.05 + 3 * np.sqrt(0.05 * 0.95 / reps)
    assert hits_cells / reps <= bound and hits_regions / reps <= bound
    assert hits_any / reps <= bound  # cells and regions are one family
    # and one test alone is not conservative far below its level (exact: 51/1024 at n = 10)
    from tlpersona.interventions.patching import sign_flip_greater

    p, _ = sign_flip_greater(rng.normal(0, 1, (4000, 10)))
    assert 0.035 <= np.mean(p <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 4000)


def test_rewording_test_finds_a_planted_persona_difference():
    """Power at a realistic size: the system-text cells' persona effect 0.15 above the
    control's (per-grid noise 0.15 per question), 10 questions; the region after the system
    text, with no difference, is called no more often than alpha allows."""
    rng = np.random.default_rng(4)
    reps, sys_hits, after_hits, cell_hits = 300, 0, 0, 0
    for _ in range(reps):
        t = _test(*_planted(rng, 10, [0.15] * 4 + [0.0] * 4))
        got = {r.position: r.carries for r in t.regions}
        sys_hits += got["system text"]
        after_hits += got["after the system text"]
        cell_hits += sum(c.carries for c in t.cells[:4])
    assert sys_hits / reps >= 0.8
    assert after_hits / reps <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / reps)
    assert cell_hits / (4 * reps) < sys_hits / reps  # one cell has less power than its region


def test_answer_names_what_carries_or_what_is_missing():
    from tlpersona.interventions.patching import answer

    rng = np.random.default_rng(5)
    t = _test(*_planted(rng, 12, [0.8] * 4 + [0.0] * 4, sd=0.05))
    s = answer(t, "")
    import re

    assert s.startswith("Beyond the rewording control")
    assert re.search(r"system text \+0\.[78]\d \(p 0\.00", s)
    assert "12 questions" in s and "of 8 cells" in s and len(s) <= 220
    weak = _test(*_planted(rng, 4, np.zeros(8)))
    s = answer(weak, "")
    assert s.startswith("No region or cell carries the persona") and len(s) <= 220
    assert "smallest reachable Holm p 0.62" in s and "needs ≥ 8 questions" in s  # 10 × 2^-4
    assert "cannot separate" in answer(None, "not run (`control` off)")
    many = _test(*_planted(rng, 16, [0.8] * 40 + [0.5] * 40, n_cells=80, sd=0.02))
    s = answer(many, "")
    assert len(s) <= 220 and "of 80 cells" in s
