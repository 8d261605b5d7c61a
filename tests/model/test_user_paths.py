"""What a new user runs into with the causal commands: a store made from their own persona
folder (patch and steer read its prompts from that folder and refuse any other), settings that
cannot give a test (refused before the model loads), and exports of the intervention that
steering evaluated (applied as another tool would apply them, they reproduce our steered run)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

import tlpersona as tlp
from tlpersona.cli import main
from tlpersona.data import Question, load_assistant_axis_personas, persona_hash
from tlpersona.errors import TlpersonaError

#: A user's own persona folder: one name the built-in set lacks, and an `assistant` whose
#: prompts are not the built-in ones.
USER_ROLES = {
    "assistant": ["You are a plain, careful assistant.", "You are a careful helper."],
    "pirate": ["You are a pirate who sails the seven seas.", "You are a salty sea pirate."],
    "lighthouse_keeper": ["You are a lonely lighthouse keeper on a northern rock.",
                          "You keep a lighthouse far from anyone."],
    "chef": ["You are a chef in a busy Paris kitchen.", "You are a pastry chef."],
}


def write_roles(root: Path, roles: dict[str, list[str]]) -> Path:
    (root / "instructions").mkdir(parents=True)
    (root / "role_list.json").write_text(json.dumps({r: r for r in roles}))
    for role, prompts in roles.items():
        (root / "instructions" / f"{role}.json").write_text(
            json.dumps({"instruction": [{"pos": p} for p in prompts]}))
    return root


@pytest.fixture(scope="module")
def user_store(loaded, tmp_path_factory):
    """A store extracted from the user's folder (two recipes, two layers, three questions)."""
    tmp = tmp_path_factory.mktemp("user")
    folder = write_roles(tmp / "roles", USER_ROLES)
    personas = load_assistant_axis_personas(folder)
    store = tlp.extract(loaded, personas, tlp.builtin_questions()[:3], positions=["last", "sys_end"],
                        layers=[7, 15], out=tmp / "store", progress=False)
    return SimpleNamespace(folder=folder, personas=personas, store=store, tmp=tmp)


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load the model fails: a refusal must come before it."""
    import tlpersona.api.causal as causal

    def refuse(*args, **kwargs):
        raise RuntimeError("the model was loaded before the settings were checked")

    monkeypatch.setattr(causal, "load_model", refuse)


def _error_line(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


# -------------------------------------------------------------------------------------------
# personas: read from the folder the store was made with, never silently from another


def test_patch_refuses_personas_that_are_not_the_stores(user_store, tmp_path, no_model):
    root = str(user_store.store.root)
    base = ["patch", "--store", root, "--out", str(tmp_path / "p"), "--n-questions", "1",
            "--layers", "7", "--positions", "last"]
    # the built-in default lacks the folder's `lighthouse_keeper`
    line = _error_line(base)
    assert "--personas lacks the store's persona 'lighthouse_keeper'" in line
    # the same names with other prompts: the hash the store keeps differs
    other = dict(USER_ROLES, assistant=["You are an assistant."])
    folder = write_roles(tmp_path / "other", other)
    line = _error_line([*base, "--personas", str(folder)])
    assert "--personas does not match the personas the store was made with" in line
    assert not (tmp_path / "p").exists()
    # steer refuses both in the same words, naming its own flag
    line = _error_line(["steer", root, "--out", str(tmp_path / "s")])
    assert "--persona-source lacks the store's persona 'lighthouse_keeper'" in line


def test_patch_with_the_stores_folder_patches_its_prompts(user_store, loaded):
    """The result names the prompts it ran on, and they are the folder's; the clean personas
    are ranked on the store (which holds `assistant`)."""
    res = tlp.patch(loaded, user_store.personas, store=user_store.store, n_personas=2,
                    n_questions=1, layers=[7], positions=["last"], method="exact",
                    control=False, progress=False)
    by_name = {p.name: p for p in user_store.personas}
    used = list({n: by_name[n] for pair in res.pairs for n in pair}.values())
    assert res.inputs.persona_hash == persona_hash(used)
    assert res.inputs.store_manifest_hash == user_store.store.manifest_hash
    assert "farthest from 'assistant'" in res.personas_note
    assert all(y == "assistant" for _, y in res.pairs)


# -------------------------------------------------------------------------------------------
# settings that cannot give a test: one line, before the model loads


@pytest.mark.parametrize("args, message", [
    # two recipes are ranked by a sign-flip over scoring questions: 1 selection + 2 scoring
    (["--n-questions", "2"], "--n-questions must be at least 3 (one to select the setting on, "
                             "2 to score it on: recipes are ranked"),
    (["--n-random", "2"], "--n-random 2 is too few for a beyond-random test: the t-prediction "
                          "needs at least 3"),
    (["--n-random", "10", "--random-test", "rank"],
     "--n-random 10 is too few for --random-test rank: over 6 recipe × operator tests"),
    (["--recipes", "last", "--operators", "add", "--n-random", "19", "--random-test", "rank"],
     "fewer than 20 random directions"),
    (["--prompt-index", "2"], "has 2 prompts; --prompt-index 2 is out of range"),
    (["--continuations", "-1"], "--continuations must be at least 0"),
    (["--fluency-margin", "nan"], "--fluency-margin must be a number"),
])
def test_steer_refuses_settings_without_a_test(user_store, tmp_path, no_model, args, message):
    out = tmp_path / "s"
    line = _error_line(["steer", str(user_store.store.root), "--persona-source",
                        str(user_store.folder), "--out", str(out), *args])
    assert message in line
    assert not out.exists()


def test_steer_question_count_counts_what_is_there(user_store):
    """Fresh questions are used only when there are enough of them for every test; too few
    questions in all is refused, naming `questions`."""
    from tlpersona.api.causal import eval_questions

    store = user_store.store
    mine = [Question(q, f"text {q}") for q in store.questions]
    two_fresh = [*mine, Question("new1", "a"), Question("new2", "b")]
    qs, note = eval_questions(store, two_fresh, 8, 3)
    # two fresh ones would leave one scoring question: every question is used, and said so
    assert [q.id for q in qs] == [q.id for q in two_fresh] and "built from these same" in note
    qs, note = eval_questions(store, two_fresh, 8, 2)
    assert [q.id for q in qs] == ["new1", "new2"] and "not built from" in note
    with pytest.raises(TlpersonaError, match="`questions` holds 2 question"):
        eval_questions(store, two_fresh[:2], 8, 3)


@pytest.mark.parametrize("args, message", [
    (["--prompt-index", "3"], "has 2 prompts; --prompt-index 3 is out of range"),
    (["--clean-personas", "assistant"], "needs at least one clean persona besides the corrupt"),
])
def test_patch_refuses_settings_without_a_test(user_store, tmp_path, no_model, args, message):
    out = tmp_path / "p"
    line = _error_line(["patch", "--store", str(user_store.store.root), "--personas",
                        str(user_store.folder), "--out", str(out), "--layers", "7",
                        "--positions", "last", *args])
    assert message in line
    assert not out.exists()


def test_patch_and_steer_api_refuse_empty_inputs_before_loading(user_store, no_model):
    with pytest.raises(TlpersonaError, match="patching needs at least one question"):
        tlp.patch("default", user_store.personas, [], store=user_store.store, layers=[7])
    with pytest.raises(TlpersonaError, match="`questions` holds 0 question"):
        tlp.steer(user_store.store, "default", user_store.personas, [])


def test_steer_config_refuses_the_first_token_and_a_store_of_the_base_alone():
    from tlpersona.interventions.steering import SteerConfig
    from tlpersona.interventions.steering.config import check_config

    store = SimpleNamespace(positions=["first", "last"], personas=["assistant", "pirate"],
                            layers=[7], layer_index=lambda layer: 0)
    with pytest.raises(TlpersonaError, match="recipe first cannot steer"):
        check_config(SteerConfig(recipes=["first"]), store)
    check_config(SteerConfig(), store)  # `first` is left out by default
    alone = SimpleNamespace(**{**vars(store), "personas": ["assistant"]})
    with pytest.raises(TlpersonaError, match="no persona besides the base 'assistant'"):
        check_config(SteerConfig(), alone)
    only_first = SimpleNamespace(**{**vars(store), "positions": ["first"]})
    with pytest.raises(TlpersonaError, match="no recipe to steer with"):
        check_config(SteerConfig(), only_first)


# -------------------------------------------------------------------------------------------
# the evaluated intervention, exported and applied by other tools


@pytest.fixture(scope="module")
def steered(user_store, loaded):
    """A small steering run on the user's store, saved as `tlpersona steer` saves it, with
    greedy steered continuations of both target personas."""
    res = tlp.steer(user_store.store, loaded, user_store.personas, tlp.builtin_questions(),
                    n_questions=3, layers=[7], operators=["add"], alphas=[1.0, 2.0],
                    n_personas=2, n_random=3, response_tokens=2, n_boot=100, continuations=2,
                    continuation_tokens=8, progress=False)
    out = user_store.tmp / "steer"
    res.save(out)
    return SimpleNamespace(result=res, dir=out, data=json.loads((out / "steering.json").read_text()))


def _eos(hf, tok) -> set[int]:
    ids = hf.generation_config.eos_token_id
    return {*(ids if isinstance(ids, list) else [ids]), tok.eos_token_id} - {None}


def _prompt_ids(tok, system: str, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "system", "content": system},
                                    {"role": "user", "content": question}],
                                   tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _adding_hook(vector, start):
    """Plain forward hook on an HF decoder layer: ``vector`` added from token ``start`` on."""
    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h[:, start:] += vector.to(h.dtype)
        return out
    return hook


def _greedy(hf, ids: list[int], n: int, eos: set[int]) -> list[int]:
    """Greedy without a cache: every step one full forward, as a hook sees the whole sequence."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(hf(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
    return out


def test_exported_intervention_reproduces_the_steered_run(user_store, steered, loaded, hf_ref,
                                                          tmp_path):
    """The files hold alpha · s_l · v/|v| (v recomputed here with numpy from the centroids);
    added by a plain HF hook at their layer from their start token, on the base persona's
    prompt from their metadata, they give steering.json's steered continuations token for token
    and our steered log-probs; the GGUF holds the same vector as llama.cpp's direction.l."""
    import gguf
    import torch
    from safetensors import safe_open

    from tlpersona.api.causal import export_intervention
    from tlpersona.interventions.runner import Runner
    from tlpersona.interventions.steering.batch import Edit, Row, run_rows

    data = steered.data
    cont = {c["persona"]: c for c in data["continuations"]}
    recipe = data["continuations"][0]["recipe"]
    out = tmp_path / "iv"
    items = export_intervention(steered.dir, user_store.store, out,
                                persona_source=user_store.personas, recipe=recipe, model=loaded)
    assert [it.persona for it in items] == data["personas"]["names"] == list(cont)
    index = json.loads((out / "intervention.json").read_text())["interventions"]
    score = next(s for s in data["scores"] if s["recipe"] == recipe)
    layer, alpha = score["setting"]["layers"][0], score["setting"]["strength"]
    norm = data["typical_norm"][str(layer)]
    store = user_store.store
    c = store.centroids(recipe)[:, store.layer_index(layer)].double().numpy()
    tok, eos = loaded.tokenizer, _eos(hf_ref, loaded.tokenizer)
    runner = Runner(loaded)
    for entry in index:
        persona = entry["persona"]
        v = c[store.personas.index(persona)] - c.mean(0)
        want = alpha * norm * v / np.linalg.norm(v)
        assert (entry["layer"], entry["alpha"], entry["typical_norm"]) == (layer, alpha, norm)
        with safe_open(str(out / entry["files"]["safetensors"]), "pt") as f:
            meta = f.metadata()
            vec = f.get_tensor(str(layer))
        np.testing.assert_allclose(vec.double().numpy(), want, rtol=1e-5, atol=1e-6)
        pt = torch.load(out / entry["files"]["pt"])
        assert list(pt) == [layer] and torch.equal(pt[layer], vec)
        reader = gguf.GGUFReader(str(out / entry["files"]["gguf"]))
        tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
        assert list(tensors) == [f"direction.{layer}"]
        np.testing.assert_array_equal(tensors[f"direction.{layer}"], vec.numpy())
        assert json.loads(meta["llamacpp_layer_range"]) == [layer, layer]
        assert meta["llamacpp_scale"] == "1.0" and meta["operator"] == "add"

        # the run steering scored: the base persona's prompt, the vector from `start` on
        ids = _prompt_ids(tok, meta["base_system_prompt"], cont[persona]["question"])
        start = int(meta["start"])
        assert ids[start - 1] == tok.convert_tokens_to_ids("<|im_end|>")  # end of the system turn
        handle = hf_ref.model.layers[layer].register_forward_hook(_adding_hook(vec, start))
        try:
            steered_ids = _greedy(hf_ref, ids, 8, eos)
            with torch.no_grad():
                ref = torch.log_softmax(hf_ref(torch.tensor([ids + steered_ids])).logits[0].double(), -1)
        finally:
            handle.remove()
        assert tok.decode(steered_ids) == cont[persona]["steered"]
        assert tok.decode(_greedy(hf_ref, ids, 8, eos)) == cont[persona]["base"]
        assert cont[persona]["steered"] != cont[persona]["base"]  # the edit does something
        full = ids + steered_ids
        read = list(range(len(ids) - 1, len(full)))
        ours = dict(run_rows(runner, [Row(full, read, [Edit(layer, start, delta=vec)])], 1))[0]
        assert (ours - ref[read]).abs().max() < 2e-4


def test_steering_vectors_applies_the_export_as_we_steered(user_store, steered, loaded, hf_ref,
                                                           tmp_path):
    sv = pytest.importorskip("steering_vectors")
    from safetensors.torch import load_file

    from tlpersona.api.causal import export_intervention

    data = steered.data
    first = data["continuations"][0]
    out = tmp_path / "iv"
    export_intervention(steered.dir, user_store.store, out, persona_source=user_store.personas,
                        personas=[first["persona"]], recipe=first["recipe"], formats=["safetensors"],
                        model=loaded)
    entry = json.loads((out / "intervention.json").read_text())["interventions"][0]
    vector = sv.SteeringVector({int(k): v for k, v in
                                load_file(out / entry["files"]["safetensors"]).items()})
    ids = _prompt_ids(loaded.tokenizer, entry["base_system_prompt"], first["question"])
    with vector.apply(hf_ref, min_token_index=entry["start"]):
        got = _greedy(hf_ref, ids, 8, _eos(hf_ref, loaded.tokenizer))
    assert loaded.tokenizer.decode(got) == first["steered"]


def _control_vector(path, n_embd: int, n_layer: int) -> np.ndarray:
    """A GGUF control vector as llama.cpp's loader reads one: every ``direction.N`` tensor
    (N ≥ 1) into an n_layer × n_embd buffer whose row N - 1 holds layer N's vector."""
    import gguf

    buf = np.zeros((n_layer, n_embd), dtype=np.float32)
    for t in gguf.GGUFReader(str(path)).tensors:
        layer = int(t.name.removeprefix("direction."))
        assert t.name == f"direction.{layer}" and 1 <= layer < n_layer
        buf[layer - 1] = np.asarray(t.data, dtype=np.float32).reshape(n_embd)
    return buf


def test_llama_cpp_adds_the_exported_gguf_where_we_steered(user_store, steered, loaded, hf_ref,
                                                           tmp_path):
    """llama.cpp, on the embedded model's own GGUF, with the exported control vector applied
    as ``--control-vector-scaled FILE 1.0 --control-vector-layer-range L L`` applies it (every
    position, strength 1): its change to the next-token logits is what a plain HF hook adding
    the same vector to block L's output at every position makes, and not what the block before
    or after would make."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    import torch

    from tlpersona.api.causal import export_intervention
    from tlpersona.models.gguf import fetch_default_gguf

    first = steered.data["continuations"][0]
    out = tmp_path / "iv"
    export_intervention(steered.dir, user_store.store, out, persona_source=user_store.personas,
                        personas=[first["persona"]], recipe=first["recipe"], formats=["gguf"],
                        model=loaded)
    entry = json.loads((out / "intervention.json").read_text())["interventions"][0]
    lo, hi = entry["llamacpp_layer_range"]
    assert lo == hi == entry["layer"] and entry["llamacpp_scale"] == 1.0
    ids = _prompt_ids(loaded.tokenizer, entry["base_system_prompt"], first["question"])
    n_layer = hf_ref.config.num_hidden_layers
    llm = llama_cpp.Llama(str(fetch_default_gguf()), n_ctx=512, n_threads=2, logits_all=True,
                          verbose=False)
    try:
        n_embd = llm.n_embd()
        cvec = _control_vector(out / entry["files"]["gguf"], n_embd, n_layer)
        assert np.count_nonzero(cvec.any(axis=1)) == 1

        def llama_logits(data: np.ndarray | None) -> np.ndarray:
            ptr = None if data is None else data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, ptr, 0 if data is None
                                                  else data.size, n_embd, lo, hi)
            assert rc == 0
            llm.reset()
            llm.eval(ids)
            return np.array(llm.scores[len(ids) - 1], dtype=np.float64)

        base, with_cvec = llama_logits(None), llama_logits(cvec * entry["llamacpp_scale"])
    finally:
        llm.close()

    def hf_logits(layer: int | None) -> np.ndarray:
        vec = torch.from_numpy(cvec[lo - 1])
        hook = (None if layer is None else
                hf_ref.model.layers[layer].register_forward_hook(_adding_hook(vec, 0)))
        try:
            with torch.no_grad():
                return hf_ref(torch.tensor([ids])).logits[0, -1].double().numpy()
        finally:
            if hook is not None:
                hook.remove()

    hf_base = hf_logits(None)
    # llama.cpp runs the Q4_1 weights, HF their dequantised copy: close, not equal
    assert np.corrcoef(base, hf_base)[0, 1] > 0.99
    ours = with_cvec - base
    assert np.abs(ours).max() > 1.0  # the control vector moves the logits
    agree = {la: np.corrcoef(ours, hf_logits(la) - hf_base)[0, 1] for la in (lo - 1, lo, lo + 1)}
    assert agree[lo] > 0.99 and agree[lo] > max(agree[lo - 1], agree[lo + 1]) + 0.02, agree


def test_intervention_export_refuses_what_was_not_evaluated(user_store, steered, loaded, tmp_path):
    from tlpersona.api.causal import export_intervention
    from tlpersona.interventions.export import check_formats

    def refused(match: str, store=None, **kw) -> None:
        with pytest.raises(TlpersonaError, match=match):
            export_intervention(steered.dir, store or user_store.store, tmp_path / "x",
                                persona_source=user_store.personas, model=loaded, **kw)
        assert not (tmp_path / "x").exists()

    other = next(p for p in user_store.store.personas
                 if p not in steered.data["personas"]["names"])
    refused(f"'{other}' was not steered", personas=[other])
    refused("`recipe` prompt_mean has no `add` result", recipe="prompt_mean")
    refused("unknown `formats` 'onnx'", formats=["onnx"])
    with pytest.raises(TlpersonaError, match="layer is 0"):
        check_formats(["gguf"], 0)
    # another store (the same folder, fewer questions): not what the run read
    again = tlp.extract(loaded, user_store.personas, tlp.builtin_questions()[:2],
                        positions=["last", "sys_end"], layers=[7], out=tmp_path / "store2",
                        progress=False)
    refused("`store` is not the store", store=again)
    # a result file without `add`
    bad = json.loads((steered.dir / "steering.json").read_text())
    for s in bad["scores"]:
        s["operator"] = "cap"
    (tmp_path / "cap.json").write_text(json.dumps(bad))
    with pytest.raises(TlpersonaError, match="no `add` result"):
        export_intervention(tmp_path / "cap.json", user_store.store, tmp_path / "x",
                            persona_source=user_store.personas, model=loaded)
