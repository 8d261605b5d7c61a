"""CLI: one-line errors with exit code 2, and a small end-to-end extract."""

import json

import pytest
from click.testing import CliRunner
from factories import SHARED_DATA

from tlpersona.cache import open_store
from tlpersona.cli import main


@pytest.mark.parametrize("args, message", [
    (["--positions", "sys_middle"], "unknown position 'sys_middle'"),
    (["--layers", "99"], "layer 99 is out of range for a 30-layer model"),
    (["--personas", "/nonexistent"], "role_list.json: file not found"),
    (["--model", "/nonexistent/model.gguf"], "GGUF file not found"),
    (["--model", "./nowhere"], "unknown model"),
    (["--prompt-index", "x"], "--prompt-index must be an integer"),
])
def test_bad_input_is_one_line_exit_2(default_source, tmp_path, args, message):
    out = tmp_path / "s"
    res = CliRunner().invoke(main, ["extract", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]
    assert not (out / "manifest.json").exists()


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared assistant-axis copy not present")
def test_extract_on_assistant_axis_dir(default_source, tmp_path):
    out = tmp_path / "s"
    res = CliRunner().invoke(main, [
        "extract", "--personas", str(SHARED_DATA),
        "--questions", str(SHARED_DATA / "extraction_questions.jsonl"),
        "--limit-personas", "2", "--limit-questions", "2",
        "--positions", "last,sys_end,sys_end+1", "--layers", "5,29", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    st = open_store(out)
    assert st.personas == ["assistant", "tutor"] and st.questions == ["0", "1"]
    assert st.per_question("last").shape == (2, 2, 2, 576)


def test_positions_command_marks_tokens(default_source):
    res = CliRunner().invoke(main, ["positions", "--system", "You are a cat.", "--question", "Hi?"])
    assert res.exit_code == 0, res.output
    marked = [line for line in res.output.splitlines() if "<- " in line]
    assert any("'<|im_end|>'" in line and "sys_end" in line for line in marked)
    assert any("'Ċ'" in line and "sys_end+1" in line for line in marked)


def test_experiment_end_to_end(default_source, tmp_path):
    out = tmp_path / "exp"
    res = CliRunner().invoke(main, [
        "experiment", "--limit-personas", "5", "--limit-questions", "3", "--max-new-tokens", "4",
        "--permutations", "19", "--splits", "2", "--layers", "7,29", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output[-2000:]
    first = (out / "compare" / "report.md").read_text()
    report = (out / "compare" / "details.md").read_text()
    # the first screen: a headline and the five answers, each naming its section; no table
    headline = first.splitlines()[2].strip("*")
    assert 0 < len(headline) <= 300 and "| pair |" not in first
    for i, (q, section) in enumerate([("Do the recipes recover", "details.md"),
                                      ("Is there a shared persona subspace", "subspace.md"),
                                      ("Which recipe's vector steers", "steering.md"),
                                      ("Where does patching carry", "patch.md"),
                                      ("Does a conversation drift", "trajectory.md")]):
        line = next(x for x in first.splitlines() if x.startswith(f"{'abcde'[i]}. **{q}"))
        assert line.endswith(f"([{section}]({section}))")
    # the drift section: both built-in conversations, one forward each, held to their personas
    traj = json.loads((out / "compare" / "trajectory.json").read_text())
    assert [c["persona"] for c in traj["conversations"]] == ["assistant", "pirate"]
    assert all(len(c["turns"]) == 3 for c in traj["conversations"])
    assert "## Drift along the assistant axis" in report
    assert "(figures/trajectories.png)" in first
    assert "assistant, drawn into role-play (assistant):" in res.output
    assert "(figures/verdicts.png)" in first and (out / "compare" / "cells.csv").exists()
    assert "| last ~ response_mean | load-bearing |" in report
    assert "## Shared persona subspace" in report
    assert "shared subspace, layer 29: k_found" in res.output
    assert (out / "compare" / "pcs.safetensors").exists()
    assert "## Activation patching" in report and "## Steering: which recipe" in report
    assert "steering add:" in res.output
    assert (out / "compare" / "steering.json").exists()
    assert open_store(out / "store").positions == [
        "last", "response_mean", "prompt_mean", "prompt_mean_no_last", "raw_system_last",
        "sys_end", "sys_end+1", "first", "prompt_mean_no_first"]
    # the sink check ran on the stored first token, and the sink-free mean was compared
    assert "## Attention-sink check" in report and "Not measured" not in report
    assert "| last ~ prompt_mean_no_first |" in report
    # 5 personas: the held-out rotation says it cannot be computed rather than give a number
    assert "too few personas" in report and "nulls are wide" in report


def test_export_seed_layout_and_wandb_offline(loaded, tmp_path, monkeypatch):
    import torch

    from tlpersona.cache.seed_layout import read_seed
    from tlpersona.chat.positions import parse_positions
    from tlpersona.data import builtin_personas, builtin_questions
    from tlpersona.extraction import ExtractConfig, extract_to_store

    cfg = ExtractConfig(parse_positions("a,c2"), [3, 29], batch_size=4, progress=False)
    store = extract_to_store(loaded, cfg, builtin_personas()[:3], builtin_questions()[:2], tmp_path / "s")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = CliRunner().invoke(main, ["export", str(store), "--seed-layout", str(tmp_path / "seed"),
                                    "--wandb-project", "tlpersona-test"])
    assert res.exit_code == 0, res.output
    st = open_store(store)
    back = read_seed(tmp_path / "seed")
    assert back.layers == [3, 29] and back.personas == st.personas
    assert torch.equal(back.centroids("c2"), st.centroids("sys_end"))
    role = st.personas[1]
    assert torch.equal(torch.load(tmp_path / "seed" / "method_a" / f"{role}.pt", weights_only=True),
                       st.centroids("last")[1])
    assert (tmp_path / "seed" / "method_a" / f"{role}__per_q.pt").exists()
    assert "W&B artifact: store-" in res.output
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # the offline run was written
