"""The notebook path: ``import tlpersona as tlp`` with plain Python values, equal to the CLI's
output files for the same inputs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import tlpersona as tlp
from tlpersona.cli import main
from tlpersona.data import Inputs, persona_hash, question_hash
from tlpersona.infra.files import json_bytes

pytestmark = pytest.mark.model

POSITIONS = ["last", "sys_end", "prompt_mean"]
LAYERS = [3, -1]  # the last block counted from the end
N_PERSONAS, N_QUESTIONS = 6, 3


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def _json(path) -> dict:
    return json.loads(path.read_text())


def _page(folder, summary: str) -> None:
    """``folder`` holds report.html: the page of its summary ``summary`` (that markdown's
    first heading in the page's title), one of the results set's own files."""
    from tlpersona.infra.paths import read_results_mark
    from tlpersona.report.html import HTML_NAME

    heading = next(line for line in (folder / summary).read_text().splitlines()
                   if line.startswith("#")).lstrip("# ").replace("`", "")
    page = (folder / HTML_NAME).read_text()
    assert f"<title>{heading}</title>" in page.replace("&#x27;", "'"), heading
    assert HTML_NAME in read_results_mark(folder).files


def _same(api: dict, path) -> None:
    assert json.loads(json_bytes(api)) == _json(path)


@pytest.fixture(scope="module")
def runs(loaded, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    personas = tlp.builtin_personas()[:N_PERSONAS]
    questions = tlp.builtin_questions()[:N_QUESTIONS]
    store = tlp.extract(loaded, personas, questions, positions=POSITIONS, layers=LAYERS,
                        out=tmp / "api_store", progress=False)
    _cli("extract", "--device", "cpu", "--dtype", "fp32", "--limit-personas", str(N_PERSONAS),
         "--limit-questions", str(N_QUESTIONS), "--positions", ",".join(POSITIONS),
         "--layers", "3,-1", "--out", str(tmp / "cli_store"))
    return tmp, store, personas, questions


def test_extract_through_the_api_equals_the_cli(runs):
    tmp, store, _, _ = runs
    cli = tlp.open_store(tmp / "cli_store")
    assert isinstance(store, tlp.Store) and store.layers == cli.layers == [3, 29]
    for p in POSITIONS:
        assert torch.equal(store.centroids(p), cli.centroids(p)), p
    vec = store.persona_vector("pirate", "last", 29)
    c = store.centroids("last")[:, 1].double()
    want = c[store.personas.index("pirate")] - c.mean(0)
    assert torch.allclose(vec.vector.double(), want, atol=1e-5)
    assert vec.provenance()["hook"] == "blocks.29.hook_resid_post"


def test_analyses_through_the_api_equal_the_cli(runs):
    tmp, store, _, _ = runs
    cmp = tlp.compare(store, layers=[-1], permutations=19, null_draws=3, splits=2)
    _cli("compare", str(store.root), "--layers", "-1", "--permutations", "19", "--null-draws",
         "3", "--splits", "2", "--out", str(tmp / "cmp"))
    _same(cmp.to_dict(), tmp / "cmp" / "results.json")
    _page(tmp / "cmp", "report.md")
    cell = cmp.cell(29, "last", "sys_end")
    assert cell.verdict in ("PASS", "GREY", "KILL") and -1 <= cell.cos_mean <= 1
    raw = next(c for c in cmp.to_dict()["cells"] if c["layer"] == 29
               and set(c["pair"]) == {"last", "sys_end"})
    assert cell.mc_r_p == raw["matrix_mc"]["mantel_p"] >= 1 / 20
    # 19 permutations cannot put a geometry beyond its null at 0.05: nothing passes, and it says so
    assert all(c.verdict != "PASS" for c in cmp.cells)
    notes = " ".join(cmp.notes)
    assert "No cell can pass here" in notes and "cannot fall below 0.050" in notes
    assert cell.within_noise == raw["within_noise"]
    assert cell.cos_min_ceiling == raw["ceiling"]["per_persona_cos_min"]

    sub = tlp.subspace(store, k_max=4)
    _cli("subspace", str(store.root), "--k-max", "4", "--out", str(tmp / "sub"))
    _same(sub.to_dict(), tmp / "sub" / "subspace.json")
    _page(tmp / "sub", "subspace.md")
    assert [lay.layer for lay in sub.layers] == [3, 29]

    proj = tlp.project(store, axis="pcs", k=2, layer=29)
    _cli("project", str(store.root), "--axis", "pcs", "--k", "2", "--layer", "29", "--out",
         str(tmp / "proj"))
    _same(proj.to_dict(), tmp / "proj" / "projection.json")


def test_patch_and_steer_through_the_api_equal_the_cli(runs, loaded):
    tmp, store, personas, questions = runs
    pat = tlp.patch(loaded, personas, questions, store=store, n_personas=2, n_questions=1,
                    layers=[3, 15], positions=["sys_end", "last"])
    _cli("patch", "--store", str(store.root), "--device", "cpu", "--dtype", "fp32",
         "--n-personas", "2", "--n-questions", "1", "--layers", "3,15", "--positions",
         "sys_end,last", "--out", str(tmp / "patch"))
    got = _json(tmp / "patch" / "patch.json")["patching"]
    _page(tmp / "patch", "patch.md")
    want = json.loads(json_bytes(pat.to_dict()))
    got.pop("seconds"), want.pop("seconds")  # wall times
    assert got == want
    # the result names what it ran on: the store that chose the clean personas, the model, and
    # the personas' prompts and questions by hash
    by_name = {p.name: p for p in personas}
    used = list({n: by_name[n] for pair in pat.pairs for n in pair}.values())
    assert pat.inputs == Inputs(loaded.info.identity, persona_hash(used),
                                question_hash(list(questions)[:1]), store.manifest_hash)

    options = dict(n_questions=2, n_personas=1, recipes=["last"], layers=[29],
                   operators=["add"], alphas=[0.125], n_random=3, response_tokens=2,
                   n_boot=100, continuations=0)
    steering = tlp.steer(store, loaded, tlp.builtin_personas(), tlp.builtin_questions(),
                         **options)
    _cli("steer", str(store.root), "--device", "cpu", "--dtype", "fp32", "--n-questions", "2",
         "--n-personas", "1", "--recipes", "last", "--layers", "29", "--operators", "add",
         "--alphas", "0.125", "--n-random", "3", "--response-tokens", "2", "--n-boot", "100",
         "--continuations", "0", "--out", str(tmp / "steer"))
    got = _json(tmp / "steer" / "steering.json")
    _page(tmp / "steer", "steering.md")
    want = json.loads(json_bytes(steering.to_dict()))
    got.pop("seconds"), want.pop("seconds")
    assert got == want
    assert steering.inputs.model_identity == loaded.info.identity
    assert steering.inputs.store_manifest_hash == store.manifest_hash
    steering.save(tmp / "steer_api")
    assert (tmp / "steer_api" / "steering.md").read_text().startswith("## Steering")


def test_prompts_file_round_trip_through_another_engine(loaded, hf_ref, tmp_path):
    """`write_prompts` → an outside engine (plain HF greedy here) writes response_ids →
    `extract(responses=...)` reads them: response_mean equals HF hidden states over exactly
    prompt + response content."""
    personas, questions = tlp.builtin_personas()[1:3], tlp.builtin_questions()[:2]
    assert tlp.write_prompts("default", personas, questions, out=tmp_path / "p.jsonl") == 4
    before = (tmp_path / "p.jsonl").read_bytes()
    with pytest.raises(tlp.TlpersonaError, match="exists; not replacing it without `overwrite`"):
        tlp.write_prompts("default", personas[:1], questions, out=tmp_path / "p.jsonl")
    assert (tmp_path / "p.jsonl").read_bytes() == before
    assert tlp.write_prompts("default", personas, questions, out=tmp_path / "p.jsonl",
                             overwrite=True) == 4
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    eos = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with (tmp_path / "r.jsonl").open("w") as f:
        for row in rows:
            ids = torch.tensor([row["prompt_ids"]])
            out = hf_ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos)
            resp = out[0, ids.shape[1]:].tolist()
            finished = eos in resp
            resp = resp[: resp.index(eos) + 1] if finished else resp
            f.write(json.dumps({k: row[k] for k in ("persona", "prompt_index", "question_id",
                                                    "prompt_sha")}
                               | {"response_ids": resp, "finished": finished}) + "\n")
    store = tlp.extract(loaded, personas, questions, positions=["response_mean"], layers=[5],
                        out=tmp_path / "s", responses=tmp_path / "r.jsonl", progress=False)
    got = store.per_question("response_mean")[0, 1, 0].float()  # first persona, second question
    row = next(json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()
               if json.loads(line)["question_id"] == questions[1].id
               and json.loads(line)["persona"] == personas[0].name)
    prompt = next(r["prompt_ids"] for r in rows if r["question_id"] == questions[1].id
                  and r["persona"] == personas[0].name)
    content = row["response_ids"][:-1] if row["finished"] else row["response_ids"]
    with torch.no_grad():
        hs = hf_ref(torch.tensor([prompt + row["response_ids"]]),
                    output_hidden_states=True).hidden_states[6][0]
    want = hs[len(prompt): len(prompt) + len(content)].mean(0)
    assert len(content) > 0
    assert torch.allclose(got, want.half().float(), atol=2e-2, rtol=1e-2)
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.9999
