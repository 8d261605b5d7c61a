"""Drift trajectories: the band's order statistics and its outside rate, planted turns flagged,
the frame against numpy, every token's residual against plain HF hidden states, and bad input
refused in one line before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import hf_resid

import tlpersona as tlp
from tlpersona.analyses.projection import Frame
from tlpersona.analyses.trajectory import band, check_percentiles, flag_line, token_values, trace
from tlpersona.api.trajectory import _plan, axis_frame_of, builtin_conversations, load_conversations
from tlpersona.cache import StoreWriter, open_store
from tlpersona.cli import main
from tlpersona.errors import TlpersonaError
from tlpersona.extraction.tokens import Conversation, TokenReader, render_conversation

# --- the band ---------------------------------------------------------------------------------


def test_band_is_the_order_statistics_numpy_calls_weibull_percentiles():
    rng = np.random.default_rng(0)
    # p (n + 1) whole: numpy's weibull percentile is exactly an order statistic there
    for n, pct in ((19, (5.0, 95.0)), (39, (10.0, 90.0)), (99, (2.0, 97.0))):
        x = rng.normal(size=n)
        b = band(x, pct)
        lo, hi = np.percentile(x, pct, method="weibull")
        assert (b.lo, b.hi) == (lo, hi)
        assert b.outside_rate == pytest.approx((100 - pct[1] + pct[0]) / 100)
    # too few values for a 5 % tail: the band is their range, and says what that costs
    x = rng.normal(size=12)
    b = band(x, (5.0, 95.0))
    assert (b.lo, b.hi, b.k_lo, b.k_hi) == (x.min(), x.max(), 1, 1)
    assert b.outside_rate == pytest.approx(2 / 13)


@pytest.mark.parametrize("n", [4, 12, 30])
def test_one_more_exchangeable_value_leaves_the_band_at_its_outside_rate(n):
    rng = np.random.default_rng(n)
    trials = 6000
    draws = rng.standard_t(3, size=(trials, n + 1))  # heavy tails: the rate is distribution-free
    rate = band(draws[0, :n], (5.0, 95.0)).outside_rate
    out = np.mean([band(d[:n], (5.0, 95.0)).side(d[n]) != "inside" for d in draws])
    se = np.sqrt(rate * (1 - rate) / trials)
    assert abs(out - rate) < 4 * se, (out, rate)
    if n == 12:  # interpolated percentiles claim 0.10 and leave about a fifth outside
        lo, hi = np.percentile(draws[:, :n], [5, 95], axis=1)
        assert 0.18 < np.mean((draws[:, n] < lo) | (draws[:, n] > hi)) < 0.26


def test_bad_percentiles_are_one_line():
    for bad in ((95, 5), (0, 50), (5, 100), (5,), (float("nan"), 95)):
        with pytest.raises(TlpersonaError, match="`band`"):
            check_percentiles(bad)
    with pytest.raises(TlpersonaError, match="at least 2 values"):
        band([1.0], (5, 95))


# --- turns and flags on planted values --------------------------------------------------------


def test_a_planted_turn_outside_its_own_band_is_flagged_and_no_other():
    rng = np.random.default_rng(1)
    own = band(rng.normal(0.0, 1.0, size=40), (5.0, 95.0))
    stored = band(rng.normal(0.0, 3.0, size=20), (5.0, 95.0))
    # tokens: system 0-4, user 5-9, assistant 10-19 (inside), user 20-24, assistant 25-34 (planted
    # far below the own band but inside the stored one), assistant 35-39 (above both)
    values = np.zeros(40)
    values[10:20] = rng.normal(0.0, 0.05, size=10)
    values[25:35] = own.lo - 1.0 + rng.normal(0.0, 0.05, size=10)
    values[35:40] = stored.hi + 5.0
    msgs = [("system", "s", 0, 5), ("user", "u", 5, 10), ("assistant", "a", 10, 20),
            ("user", "u", 20, 25), ("assistant", "b", 25, 35), ("assistant", "c", 35, 40)]
    conv = trace("planted", "p", own, stored, msgs, range(40), ["t"] * 40, values)
    assert [t.index for t in conv.turns] == [1, 2, 3] and [t.message for t in conv.turns] == [2, 4, 5]
    for t, (a, b) in zip(conv.turns, [(10, 20), (25, 35), (35, 40)], strict=True):
        assert t.value == pytest.approx(values[a:b].mean(), abs=1e-15)
    assert [t.own for t in conv.turns] == ["inside", "below", "above"]
    assert [t.stored for t in conv.turns] == ["inside", "inside" if own.lo - 1 > stored.lo else "below",
                                              "above"]
    lines = [flag_line("planted", t, "p", own, "x") for t in conv.turns]
    assert lines[0] is None
    assert lines[1].startswith("planted assistant turn 2: ") and "below p's own band" in lines[1]
    assert "above p's own band" in lines[2] and "40 per-question readings" in lines[2]
    assert "\n" not in lines[1] + lines[2]
    # without an own band nothing is flagged
    bare = trace("bare", None, None, stored, msgs, range(40), ["t"] * 40, values)
    assert all(t.own is None for t in bare.turns)
    assert all(flag_line("bare", t, "p", own, "x") is None for t in bare.turns)


def test_token_values_are_the_projection_onto_the_unit_axis():
    rng = np.random.default_rng(2)
    d = 16
    axis = rng.normal(size=d)
    mean = rng.normal(size=d)
    frame = Frame(mean, 1.0, (axis / np.linalg.norm(axis))[None], ["a"])
    x = rng.normal(size=(30, d))
    want = [float(np.dot(row - mean, axis) / np.sqrt(np.sum(axis ** 2))) for row in x]
    np.testing.assert_allclose(token_values(frame, x), want, rtol=1e-12, atol=1e-12)


# --- the frame and the own band on a synthetic store ------------------------------------------

N_P, N_Q, D, LAYERS = 8, 6, 12, [2, 5]
SYN_POSITIONS = ["last", "response_mean", "sys_end"]


def _synthetic(root: Path, seed: int = 0, identity: str = "none") -> Path:
    prov = {"personas": ["assistant", *[f"p{i}" for i in range(1, N_P)]],
            "questions": [f"q{j}" for j in range(N_Q)], "layers": LAYERS,
            "positions": SYN_POSITIONS, "prompt_index": 0, "responses_hash": None,
            "model": "/nonexistent-model", "model_identity": identity}
    w = StoreWriter(root, prov, {"d_model": D, "n_layers_total": 6})
    g = torch.Generator().manual_seed(seed)
    for i in range(N_P):
        t = {"sys_end/centroid": torch.randn(len(LAYERS), D, generator=g)}
        for pos in ("last", "response_mean"):
            own = 3 * torch.randn(1, 1, D, generator=g)  # the persona's place, its questions around it
            per_q = (torch.randn(N_Q, len(LAYERS), D, generator=g) + own).half()
            valid = torch.ones(N_Q, dtype=torch.uint8)
            valid[i % N_Q] = 0  # one missing row per persona: left out of the band
            t[f"{pos}/per_question"] = per_q * valid[:, None, None]
            t[f"{pos}/centroid"] = per_q[valid.bool()].float().mean(0)
            t[f"{pos}/valid"] = valid
        w.write_part(i, t)
    w.finalize()
    return root


@pytest.fixture
def syn(tmp_path) -> Path:
    return _synthetic(tmp_path / "s")


def test_the_persona_axis_stored_values_and_own_bands_match_numpy(syn):
    convs = [Conversation.of([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                             persona=name) for name in ("assistant", "p3")]
    plan = _plan(syn, convs, "persona:assistant", None, 5, None, None, (5.0, 95.0))
    st = open_store(syn)
    assert plan.position == "response_mean" and plan.layer == 5
    c = st.centroids("response_mean")[:, 1].double().numpy()
    axis = c[0] - c[1:].mean(0)
    want = (c - c.mean(0)) @ (axis / np.linalg.norm(axis))
    np.testing.assert_allclose(list(plan.stored.values()), want, rtol=1e-10)
    # 8 personas: the band is their range
    assert (plan.stored_band.lo, plan.stored_band.hi) == pytest.approx((want.min(), want.max()), rel=1e-12)
    # the same frame as `project` uses
    proj = tlp.project(syn, layer=5, positions=["response_mean"]).to_dict()
    np.testing.assert_allclose([r["coords"]["assistant axis"] for r in proj["stored"]["response_mean"]],
                               want, rtol=1e-10)
    for name in ("assistant", "p3"):
        i = st.personas.index(name)
        rows = st.per_question("response_mean")[i, :, 1].double().numpy()
        keep = st.valid("response_mean")[i].numpy()
        vals = (rows[keep] - c.mean(0)) @ (axis / np.linalg.norm(axis))
        assert plan.own[name].n == N_Q - 1
        assert (plan.own[name].lo, plan.own[name].hi) == pytest.approx((vals.min(), vals.max()), rel=1e-12)


def test_pc_axes_equal_the_subspace_components(syn, tmp_path):
    frame = axis_frame_of(syn, "pc:2", "last", 2)
    sub = tlp.subspace(syn, null_draws=0)
    np.testing.assert_allclose(frame.basis[0], sub.components[2][1], rtol=1e-10, atol=1e-12)
    st = open_store(syn)
    c = st.centroids("last")[:, 0].double().numpy()
    assert frame.scale == pytest.approx(np.linalg.norm(c - c.mean(0)))  # unit-norm recipes
    sub.save(tmp_path / "sub")
    saved = axis_frame_of(syn, "pc:2", "last", 2, tmp_path / "sub")
    np.testing.assert_allclose(saved.basis, frame.basis, rtol=1e-5, atol=1e-6)  # saved as fp32
    other = _synthetic(tmp_path / "other", seed=1, identity="another")
    with pytest.raises(TlpersonaError, match="computed on another store"):
        axis_frame_of(other, "pc:2", "last", 2, tmp_path / "sub")
    with pytest.raises(TlpersonaError, match="only .* shared PCs"):
        axis_frame_of(syn, "pc:99", "last", 2)


def test_a_question_invariant_recipe_gives_no_own_band_and_says_so(syn):
    convs = [Conversation.of([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                             persona="p1")]
    plan = _plan(syn, convs, "persona:assistant", "sys_end", None, None, None, (5.0, 95.0))
    assert plan.own == {"p1": None} and plan.layer == 5  # the middle stored layer, as in project
    assert any("sys_end stores one reading per persona" in n for n in plan.notes)


# --- reading conversations and bad input ------------------------------------------------------


def test_conversations_jsonl_forms_and_builtins(tmp_path):
    path = tmp_path / "c.jsonl"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}]
    path.write_text(json.dumps(msgs) + "\n\n" + json.dumps({"messages": msgs, "persona": "pirate",
                                                            "label": "named"}) + "\n")
    a, b = load_conversations(path)
    assert a.label == "conversation:1" and a.persona is None and a.system == "S"
    assert b.label == "named" and b.persona == "pirate" and b.messages == a.messages
    built = builtin_conversations()
    assert [c.persona for c in built] == ["assistant", "pirate"]
    assert all(sum(m.role == "assistant" for m in c.messages) >= 3 for c in built)
    names = {p.name: p.system_prompts for p in tlp.builtin_personas()}
    assert all(c.system in names[c.persona] for c in built)  # their system prompt is the persona's


def _cli(*args: str) -> tuple[int, list[str], str]:
    res = CliRunner().invoke(main, ["trajectory", *args])
    return res.exit_code, [x for x in res.output.splitlines() if x.startswith("error:")], res.output


BAD_LINES = {
    "missing": (None, "file not found"),
    "json": ("{bad\n", "c.jsonl:1: invalid JSON"),
    "no_assistant": ('[{"role": "user", "content": "hi"}]\n', "c.jsonl:1: no assistant turn"),
    "second": ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n'
               '[{"role": "tool", "content": "x"}]\n', "c.jsonl:2: message 0 has role 'tool'"),
    "empty": ('[{"role": "user", "content": " "}, {"role": "assistant", "content": "yo"}]\n',
              "message 0 (user) is empty"),
    "late_system": ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
                    '{"role": "assistant", "content": "c"}]\n', "only the first may be"),
    "persona": ('{"persona": "nobody", "messages": [{"role": "user", "content": "hi"}, '
                '{"role": "assistant", "content": "yo"}]}\n', "c.jsonl:1: persona 'nobody' is not"),
    "key": ('{"messages": [], "who": 1}\n', "unknown key 'who'"),
    "blank": ("\n\n", "no conversations"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_conversations_are_one_line_before_the_model_loads(syn, tmp_path, case):
    text, message = BAD_LINES[case]
    path = tmp_path / "c.jsonl"
    if text is not None:
        path.write_text(text)
    # the store names a model that does not exist: reaching it would be another error
    code, errors, output = _cli(str(syn), "--conversations", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and len(errors) == 1 and message in errors[0], output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--layer", "3"], "layer 3 is not in this store"),
    (["--layer", "-2"], "layer 4 is not in this store"),
    (["--axis", "persona:nobody"], "--axis persona 'nobody' is not in the store"),
    (["--axis", "pc:0"], "PCs are numbered from 1"),
    (["--axis", "pcs"], "unknown --axis 'pcs'"),
    (["--axis", "pc:1", "--position", "sys_end", "--subspace", "nowhere"], "--subspace nowhere"),
    (["--subspace", "x"], "--subspace goes with a --axis pc:K"),
    (["--position", "sys_end+1"], "position sys_end+1 is not in this store"),
    (["--band", "50,50"], "--band must be two percentiles"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_options_are_one_line_before_the_model_loads(syn, tmp_path, args, message):
    code, errors, output = _cli(str(syn), "--out", str(tmp_path / "o"), *args)
    assert code == 2 and len(errors) == 1 and message in errors[0], output
    assert not (tmp_path / "o").exists()


def test_a_store_model_that_does_not_exist_is_reached_only_after_the_checks(syn, tmp_path):
    code, errors, output = _cli(str(syn), "--out", str(tmp_path / "o"))
    assert code == 2 and len(errors) == 1 and "nonexistent-model" in errors[0], output


def test_the_api_names_its_parameters(syn):
    with pytest.raises(TlpersonaError, match="`batch_size` must be at least 1"):
        tlp.trajectory(syn, batch_size=0)
    with pytest.raises(TlpersonaError, match=r"`conversations`\[0\]: persona 'x' is not in the store"):
        tlp.trajectory(syn, conversations=[Conversation.of(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], persona="x")])
    with pytest.raises(TlpersonaError, match="`conversations` is empty"):
        tlp.trajectory(syn, conversations=[])


# --- the embedded model against plain HF ------------------------------------------------------

MULTI = Conversation.of([
    {"role": "system", "content": "You are a pirate captain who has spent forty years at sea."},
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"},
    {"role": "user", "content": "Tell me about storms."},
    {"role": "assistant", "content": "  Storms be cruel, lad; reef the sails early.  "},
    {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "Fair winds."}])


@pytest.mark.usefixtures("one_thread")
def test_every_tokens_residual_equals_hf_hidden_states(loaded, hf_ref):
    convs = [MULTI, *builtin_conversations()]
    from tlpersona.chat.template import ChatRenderer

    renderer = ChatRenderer(loaded.tokenizer)
    rendered = [render_conversation(renderer, c) for c in convs]
    n = loaded.info.n_layers
    layers = [0, 7, 15, n - 1]
    got = TokenReader(loaded, layers, batch_size=2).residuals([r.ids for r in rendered])  # padded
    tok = loaded.tokenizer
    for c, r, x in zip(convs, rendered, got, strict=True):
        msgs = [{"role": m.role, "content": m.content} for m in c.messages]
        ids = list(tok.apply_chat_template(msgs, return_dict=True)["input_ids"])
        assert ids == r.ids  # the template's own tokenisation
        for m, s in zip(c.messages, r.spans, strict=True):
            assert tok.decode(r.ids[s.start:s.stop]).strip() == m.content.strip()
        # the last block's output is before the final norm, which hidden_states[-1] has
        want = hf_resid(hf_ref, ids, layers)
        assert x.shape == (len(ids), len(layers), loaded.info.d_model)
        for s in (s for s in r.spans if s.role == "assistant"):
            for li, layer in enumerate(layers):
                assert torch.equal(x[s.start:s.stop, li], want[li, s.start:s.stop]), (c.label, layer)


@pytest.fixture(scope="module")
def real_store(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "store"
    return tlp.extract(loaded, tlp.builtin_personas()[:5], tlp.builtin_questions()[:4],
                       positions=["last", "response_mean"], layers=[3, 15], max_new_tokens=8,
                       out=out, batch_size=8, progress=False).root


@pytest.mark.usefixtures("one_thread")
def test_trajectory_against_hf_and_numpy_one_forward_per_batch(loaded, hf_ref, real_store,
                                                                 tmp_path, monkeypatch):
    calls = []
    run = loaded.bridge.run_with_cache
    monkeypatch.setattr(loaded.bridge, "run_with_cache",
                        lambda *a, **k: calls.append(a[0].shape) or run(*a, **k))
    convs = [*builtin_conversations(), MULTI]
    result = tlp.trajectory(real_store, loaded, convs)
    assert len(calls) == 1 and calls[0][0] == 3  # every conversation in one batch, once
    monkeypatch.setattr(loaded.bridge, "run_with_cache", run)
    st = open_store(real_store)
    assert (result.position, result.layer, result.axis_name) == ("response_mean", 15, "assistant axis")
    c = st.centroids("response_mean")[:, 1].double().numpy()
    axis = c[0] - c[1:].mean(0)
    unit, mean = axis / np.linalg.norm(axis), c.mean(0)
    tok = loaded.tokenizer
    for conv, traj in zip(convs, result.conversations, strict=True):
        msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
        ids = list(tok.apply_chat_template(msgs, return_dict=True)["input_ids"])
        with torch.no_grad():
            h = hf_ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[16][0].double().numpy()
        want = (h - mean) @ unit
        np.testing.assert_allclose(traj.values, want, rtol=1e-6, atol=1e-5 * np.abs(want).max())
        assert traj.token_ids == ids and len(traj.tokens) == len(ids)
        for t in traj.turns:
            assert t.value == pytest.approx(want[t.start:t.stop].mean(), rel=1e-6, abs=1e-5)
    # MULTI's system prompt is the pirate's: found without being named
    assert result.conversations[2].persona == "pirate"
    # the own band and the flags, computed again from the store by hand
    flags = []
    for traj in result.conversations:
        i = st.personas.index(traj.persona)
        rows = st.per_question("response_mean")[i, :, 1].double().numpy()
        vals = np.sort((rows[st.valid("response_mean")[i].numpy()] - mean) @ unit)
        assert traj.own_band.lo == pytest.approx(vals[0]) and traj.own_band.hi == pytest.approx(vals[-1])
        flags += [(traj.label, t.index) for t in traj.turns if not vals[0] <= t.value <= vals[-1]]
    assert [(f.split(" assistant turn ")[0], int(f.split(" assistant turn ")[1].split(":")[0]))
            for f in result.flags] == flags
    # saved, read back equal; the files hold every turn and token
    md = result.save(tmp_path / "o")
    assert tlp.TrajectoryResult.load(tmp_path / "o") == result
    data = json.loads((tmp_path / "o" / "trajectory.json").read_text())
    assert data["code_version"] == tlp.__version__
    assert data["inputs"]["store_manifest_hash"] == st.manifest_hash
    turns = (tmp_path / "o" / "trajectory.csv").read_text().splitlines()
    assert len(turns) == 1 + sum(len(t.turns) for t in result.conversations)
    import pandas as pd

    frame, table = result.to_frame(), pd.read_csv(tmp_path / "o" / "trajectory.csv")
    assert list(frame["label"]) == list(table["label"])
    assert list(frame["index"]) == list(table["assistant_turn"])
    np.testing.assert_allclose(frame["value"], table["value"], rtol=1e-12)
    assert list(frame["own"]) == list(table["own_side"])
    import csv

    with open(tmp_path / "o" / "tokens.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + sum(len(t.values) for t in result.conversations)
    for name in ("trajectories", "trajectory_1", "tokens_3"):
        assert (tmp_path / "o" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Drift along the assistant axis" in md.read_text()
    assert "TrajectoryResult(3 conversations" in repr(result)


def test_cli_and_the_experiment_section(loaded, real_store, tmp_path, monkeypatch):
    import tlpersona.models.loading
    from tlpersona.api.trajectory import builtin_trajectory
    from tlpersona.infra.paths import read_results_mark

    monkeypatch.setattr(tlpersona.models.loading, "load_model", lambda *a, **k: loaded)
    code, errors, output = _cli(str(real_store), "--out", str(tmp_path / "o"))
    assert code == 0, output
    assert "assistant, drawn into role-play (assistant): " in output
    assert "written: " in output and (tmp_path / "o" / "trajectory.md").exists()
    page = (tmp_path / "o" / "report.html").read_text()
    assert "<title>Drift along the assistant axis</title>" in page
    assert "report.html" in read_results_mark(tmp_path / "o").files
    code, errors, _ = _cli(str(real_store), "--out", str(tmp_path / "o"))
    assert code == 2 and "--overwrite" in errors[0]
    section = builtin_trajectory(real_store, loaded)
    assert [c.persona for c in section.conversations] == ["assistant", "pirate"]
    assert section.answer().startswith("Assistant turns on the assistant axis")
