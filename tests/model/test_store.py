"""Activation store: round trip, resume after interruption, provenance refusal."""

import json

import pytest
import torch

from tlpersona.cache import open_store
from tlpersona.chat.positions import parse_positions
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.errors import TlpersonaError
from tlpersona.extraction import ExtractConfig, Extractor, extract_to_store

LAYERS = [3, 15, 29]
PERSONAS = builtin_personas()[:3]
QUESTIONS = builtin_questions()[:3]


def _cfg(layers=LAYERS):
    return ExtractConfig(parse_positions("last,sys_end,sys_end+1,prompt_mean,c1"), layers,
                         batch_size=2, progress=False)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def full_store(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    extract_to_store(loaded, _cfg(), PERSONAS, QUESTIONS, out)
    return out


def test_round_trip_shapes_and_values(loaded, full_store):
    st = open_store(full_store)
    assert st.personas == [p.name for p in PERSONAS]
    assert st.questions == [q.id for q in QUESTIONS]
    assert st.layers == LAYERS
    assert st.positions == ["last", "sys_end", "sys_end+1", "prompt_mean", "raw_system_last"]
    d = loaded.info.d_model
    assert st.centroids("c2").shape == (3, 3, d)
    assert st.per_question("last").shape == (3, 3, 3, d)
    assert st.per_question("last").dtype == torch.float16
    assert st.centroids("last").dtype == torch.float32
    assert st.valid("last").all()
    with pytest.raises(TlpersonaError, match="does not depend on the question"):
        st.per_question("sys_end")
    direct = Extractor(loaded, _cfg()).persona(PERSONAS[1], QUESTIONS)
    torch.testing.assert_close(st.centroids("sys_end+1")[1], direct.centroid["sys_end+1"])
    torch.testing.assert_close(st.per_question("last")[1].float(), direct.per_question["last"],
                               atol=0.5, rtol=1e-3)  # fp16 storage
    manifest = json.loads((full_store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["provenance"]["layers"] == LAYERS
    assert set(manifest["files"]) == {f"{p}.safetensors" for p in st.positions}
    assert not (full_store / "parts").exists()


def test_resume_after_interruption_is_identical(loaded, full_store, tmp_path):
    out = tmp_path / "s"
    seen = []

    def stop_after_first_group(group):
        seen.append(group)
        raise Stop

    with pytest.raises(Stop):
        extract_to_store(loaded, _cfg(), PERSONAS, QUESTIONS, out, on_group=stop_after_first_group)
    with pytest.raises(TlpersonaError, match="incomplete"):
        open_store(out)
    stats = {}
    extract_to_store(loaded, _cfg(), PERSONAS, QUESTIONS, out, stats=stats)
    assert stats == {"computed": len(PERSONAS) - len(seen[0]), "reused": len(seen[0])}
    a, b = open_store(out), open_store(full_store)
    for pos in a.positions:  # bit-identical to the uninterrupted run
        assert torch.equal(a.centroids(pos), b.centroids(pos)), pos
        if a.has_per_question(pos):
            assert torch.equal(a.per_question(pos), b.per_question(pos)), pos


def test_mismatched_provenance_is_refused(loaded, full_store):
    with pytest.raises(TlpersonaError, match="different layers"):
        extract_to_store(loaded, _cfg([3, 15]), PERSONAS, QUESTIONS, full_store)
    with pytest.raises(TlpersonaError, match="personas"):
        extract_to_store(loaded, _cfg(), PERSONAS[:2], QUESTIONS, full_store)


def test_unknown_position_in_store(full_store):
    with pytest.raises(TlpersonaError, match="not in this store"):
        open_store(full_store).centroids("response_mean")


def test_not_a_store(tmp_path):
    with pytest.raises(TlpersonaError, match="not a tlpersona store"):
        open_store(tmp_path)


def test_plain_reader_matches_safetensors(full_store):
    from safetensors.torch import load_file

    from tlpersona.cache.reader import read_tensor

    want = load_file(full_store / "last.safetensors")
    for key in ("per_question", "centroids", "valid"):
        assert torch.equal(read_tensor(full_store / "last.safetensors", key), want[key])
    st = open_store(full_store)
    assert torch.equal(st.per_question("last", 15), want["per_question"][:, :, 1])
    assert st.n_tokens("last") is None
    n_tok = st.n_tokens("prompt_mean")
    assert n_tok.shape == (3, 3) and bool((n_tok > 20).all())  # prompt lengths in tokens


def test_parts_of_a_killed_run_are_not_reused_by_other_settings(loaded, tmp_path):
    """Killed after its first part, manifest removed, rerun with another prompt index: the part
    made with prompt 0 is refused (nothing written), never reported as already extracted."""
    from dataclasses import replace

    out = tmp_path / "s"

    def stop(group):
        raise Stop

    with pytest.raises(Stop):
        extract_to_store(loaded, _cfg(), PERSONAS, QUESTIONS, out, on_group=stop)
    (out / "manifest.json").unlink()
    parts = sorted(p.name for p in (out / "parts").iterdir())
    other = replace(_cfg(), prompt_index=1)
    with pytest.raises(TlpersonaError, match=f"parts/{parts[0]} was made by a run with a "
                                             "different prompt_index"):
        extract_to_store(loaded, other, PERSONAS, QUESTIONS, out)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "parts").iterdir()) == parts
    stats = {}
    extract_to_store(loaded, other, PERSONAS, QUESTIONS, out, force_new=True, stats=stats)
    assert stats == {"computed": len(PERSONAS), "reused": 0}
    assert open_store(out).provenance["prompt_index"] == 1


def test_store_object_refuses_reads_after_its_directory_is_extracted_anew(loaded, full_store,
                                                                          tmp_path):
    import shutil
    from dataclasses import replace

    out = tmp_path / "s"
    shutil.copytree(full_store, out)
    st = open_store(out)
    before = st.centroids("last").clone()
    extract_to_store(loaded, replace(_cfg(), prompt_index=1), PERSONAS, QUESTIONS, out,
                     force_new=True)
    assert not torch.equal(open_store(out).centroids("last"), before)
    with pytest.raises(TlpersonaError, match="changed after it was opened"):
        st.centroids("last")
    with pytest.raises(TlpersonaError, match="changed after it was opened"):
        st.persona_vector(PERSONAS[0].name, "prompt_mean", 15)
