"""Projection of stored personas and new material onto a persona axis or shared PCs."""

import json

import numpy as np
import pytest

import tlpersona as tlp
from tlpersona.cache import open_store
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.errors import TlpersonaError
from tlpersona.extraction import ExtractConfig, extract_to_store
from tlpersona.positions import parse_positions

PERSONAS = builtin_personas()[:5]  # includes "assistant"
QUESTIONS = builtin_questions()[:2]


@pytest.fixture(scope="module")
def store(loaded, tmp_path_factory):
    cfg = ExtractConfig(parse_positions("last,sys_end,c1"), [3, 29], batch_size=4, progress=False)
    return extract_to_store(loaded, cfg, PERSONAS, QUESTIONS, tmp_path_factory.mktemp("p") / "s")


def test_assistant_axis_matches_numpy(store, tmp_path):
    result = tlp.project(store, layer=29)
    result.save(tmp_path / "o")
    res = result.to_dict()
    st = open_store(store)
    for pos in ("last", "sys_end", "raw_system_last"):
        c = st.centroids(pos)[:, 1].double().numpy()
        axis = c[0] - c[1:].mean(0)  # persona 0 is "assistant"
        want = (c - c.mean(0)) @ (axis / np.linalg.norm(axis))
        got = [r["coords"]["assistant axis"] for r in res["stored"][pos]]
        np.testing.assert_allclose(got, want, rtol=1e-9)
    rows = (tmp_path / "o" / "projection.csv").read_text().splitlines()
    assert rows[0] == "kind,label,recipe,layer,assistant axis" and len(rows) == 1 + 3 * 5
    assert (tmp_path / "o" / "projection.png").read_bytes()[:4] == b"\x89PNG"


def test_new_persona_with_a_stored_prompt_lands_on_that_persona(store, tmp_path):
    target = PERSONAS[2]
    result = tlp.project(store, layer=29, axis="pcs", k=3,
                         systems=[(target.system_prompts[0], [q.text for q in QUESTIONS])])
    result.save(tmp_path / "o")
    res = result.to_dict()
    assert {it["recipe"] for it in res["items"]} == {"last", "sys_end", "raw_system_last"}
    for it in res["items"]:
        stored = next(r for r in res["stored"][it["recipe"]] if r["persona"] == target.name)
        for k, v in it["coords"].items():
            assert v == pytest.approx(stored["coords"][k], rel=1e-4, abs=1e-3), (it["recipe"], k)
        assert it["nearest"][0]["persona"] == target.name
        assert it["nearest"][0]["cos"] > 0.9999
    saved = json.loads((tmp_path / "o" / "projection.json").read_text())
    assert saved["axis"] == "pcs" and saved["layer"] == 29


def test_pc_coordinates_are_centred(store, tmp_path):
    res = tlp.project(store, axis="pcs", k=2).to_dict()
    for rows in res["stored"].values():
        pc1 = np.array([r["coords"]["PC1"] for r in rows])
        assert abs(pc1.mean()) < 1e-6 * (np.abs(pc1).max() + 1)


def test_unknown_axis_persona(store, tmp_path):
    with pytest.raises(TlpersonaError, match="persona 'nobody' is not in the store"):
        tlp.project(store, axis="persona:nobody")
