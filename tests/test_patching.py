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
from tlpersona.interventions.patching import PatchConfig, align, choose_clean, patch_example, run_patching
from tlpersona.interventions.runner import Runner, kl

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
    from tlpersona.extraction import ExtractConfig, extract_to_store
    from tlpersona.positions import parse_positions

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
    # no null yet: the report says so, picks no "largest" cell, and marks the cell that is 1
    # by construction (the residual after the last block at the read position)
    assert "Descriptive; read beside the rewording control" in md
    assert "Largest KL effects" not in md and "largest |KL effect|" not in md
    row = next(line for line in md.splitlines() if line.startswith("| last |"))
    assert row.rstrip(" |").endswith("¹") and row.count("¹") == 1
    assert data["n_layers"] == 30
    assert "Rewording control, exact `resid_post`" in md and data["control"]
    assert "rewording control: clean = 'assistant' in its phrasing" in res.output


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
    from tlpersona.cache.store import open_store
    from tlpersona.interventions.steering import choose_personas, default_recipes

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
    persona is the corrupt persona in its next phrasing; it is absent, with the reason, where no
    single corrupt persona has a second phrasing."""
    from tlpersona.interventions.patching import reworded

    ps, qs = builtin_personas(), builtin_questions()[:2]
    assistant = next(p for p in ps if p.name == "assistant")
    cfg = PatchConfig(layers=[3, 29], positions=["sys_end", "last"], method="exact",
                      progress=False)
    res = run_patching(runner, [ps[1], assistant], qs, cfg)
    assert "phrasing 1 instead of 0 (2 examples)" in res.control_note
    other = reworded(assistant, 0)
    assert other.system_prompts[0] == assistant.system_prompts[1]
    direct = run_patching(runner, [other, assistant], qs, PatchConfig(
        layers=[3, 29], positions=["sys_end", "last"], method="exact", control=False,
        progress=False))
    assert direct.control == [] and "off" in direct.control_note
    got = {(c.position, c.layer): (c.kl_effect, c.ld_effect, c.n) for c in res.control}
    want = {(c.position, c.layer): (c.kl_effect, c.ld_effect, c.n) for c in direct.cells}
    assert got == want and got[("last", 29)][0] == pytest.approx(1, abs=1e-6)
    nxt = run_patching(runner, ps[:2], qs[:1], PatchConfig(
        layers=[3], positions=["last"], method="exact", corrupt="next", progress=False))
    assert nxt.control == [] and "no single corrupt persona" in nxt.control_note
