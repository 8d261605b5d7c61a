"""Projection of stored personas and new material onto a persona axis or shared PCs."""

import json

import numpy as np
import pytest

import tlpersona as tlp
from tlpersona.analyses.projection import nearest
from tlpersona.cache import open_store
from tlpersona.chat.positions import parse_positions
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.errors import TlpersonaError
from tlpersona.extraction import ExtractConfig, extract_to_store

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
        # the stored copy's own top cosine is the item: rank 1 or 2 of 6, never below p = 1/6
        assert it["nearest_pool"] == 6 and it["nearest_rank"] in (1, 2)
        assert it["nearest_p"] == it["nearest_rank"] / 6 and it["nearest_p_holm"] >= it["nearest_p"]
    point = next(pt for pt in result.points if not pt.stored)
    assert ("cannot be shown closer than one more persona with 5 personas and 3 tests "
            "(Holm p >= 0.500)") in point.nearest.text()
    saved = json.loads((tmp_path / "o" / "projection.json").read_text())
    assert saved["axis"] == "pcs" and saved["layer"] == 29
    # what was projected is in the file, beside the store it was projected into
    assert {it["text"] for it in saved["items"]} == {target.system_prompts[0]}
    assert all(it["questions"] == [q.text for q in QUESTIONS] for it in saved["items"])
    st = open_store(store)
    assert saved["inputs"] == {"model_identity": st.provenance["model_identity"],
                               "persona_hash": st.provenance["persona_hash"],
                               "question_hash": st.provenance["question_hash"],
                               "store_manifest_hash": st.manifest_hash}


def test_pc_coordinates_are_centred(store, tmp_path):
    res = tlp.project(store, axis="pcs", k=2).to_dict()
    for rows in res["stored"].values():
        pc1 = np.array([r["coords"]["PC1"] for r in rows])
        assert abs(pc1.mean()) < 1e-6 * (np.abs(pc1).max() + 1)


def test_unknown_axis_persona(store, tmp_path):
    with pytest.raises(TlpersonaError, match="persona 'nobody' is not in the store"):
        tlp.project(store, axis="persona:nobody")


def _pool_ranks(cent, x):
    """Independent loop: each pool member against the others, centred on the others' mean."""
    pool = list(cent) + [x]
    tops = []
    for j, v in enumerate(pool):
        others = np.array([w for i, w in enumerate(pool) if i != j])
        m = others.mean(0)
        a = (others - m) / np.linalg.norm(others - m, axis=1, keepdims=True)
        b = (v - m) / np.linalg.norm(v - m)
        tops.append(max(a @ b))
    return tops


def test_nearest_needs_two_stored_personas():
    with pytest.raises(TlpersonaError, match="at least 2 stored personas"):
        nearest(np.ones(3), np.ones((1, 3)), ["only"])


def test_nearest_rank_matches_an_independent_loop():
    rng = np.random.default_rng(3)
    cent, x = rng.normal(size=(9, 20)), rng.normal(size=20)
    x = cent[4] + 0.5 * rng.normal(size=20)
    names = [f"p{i}" for i in range(9)]
    got = nearest(x, cent, names, top=3)
    tops = _pool_ranks(cent, x)
    assert got.pool == 10 and got.rank == sum(t >= tops[-1] for t in tops)
    m = cent.mean(0)
    cos = [(v - m) @ (x - m) / np.linalg.norm(v - m) / np.linalg.norm(x - m) for v in cent]
    want = sorted(zip(names, cos, strict=True), key=lambda t: -t[1])[:3]
    assert [n for n, _ in got.top] == [n for n, _ in want] == ["p4", *[n for n, _ in want[1:]]]
    np.testing.assert_allclose([c for _, c in got.top], [c for _, c in want], rtol=1e-12)


@pytest.mark.parametrize("clustered", [False, True])
def test_nearest_p_is_calibrated_for_one_more_persona(clustered):
    """Planted null: the item is drawn like the stored personas. The rank p must reject at most
    as often as its level (the stored personas' leave-one-out cosines alone, n - 1 candidates
    against the item's n, rejected 7 % at 26 isotropic personas where 3.7 % is the most allowed)."""
    rng = np.random.default_rng(0)
    n, d, draws = 26, 64, 500
    hits = 0
    for _ in range(draws):
        if clustered:
            centres = 2 * rng.normal(size=(4, d))
            a = centres[rng.integers(0, 4, n + 1)] + rng.normal(size=(n + 1, d))
        else:
            a = rng.normal(size=(n + 1, d))
        hits += nearest(a[n], a[:n], [str(i) for i in range(n)]).p <= 0.05
    assert hits / draws <= 0.055  # exact level 1/27 = 0.037


def test_a_near_copy_of_a_stored_persona_is_found():
    rng = np.random.default_rng(1)
    n, d = 60, 64
    ranks = []
    for _ in range(50):
        cent = rng.normal(size=(n, d))
        got = nearest(cent[7] + 0.3 * rng.normal(size=d), cent, [str(i) for i in range(n)])
        assert got.top[0][0] == "7"
        ranks.append(got.rank)
    assert max(ranks) <= 2 and max(ranks) / (n + 1) < 0.05


def test_a_system_item_without_questions_is_built_from_the_store_questions(store):
    """No questions given: the item asks the store's own (texts from the built-in set, checked
    against the store's hash), so it is built as a stored centroid is and its p is exact; the
    combined rank over the recipes is reported per item. Questions of one's own are not
    exact for recipes that read the question."""
    target = PERSONAS[2]
    own = tlp.project(store, layer=29, systems=[(target.system_prompts[0], [])])
    given = tlp.project(store, layer=29, systems=[(target.system_prompts[0], ["Who are you?"])])
    items = own.to_dict()["items"]
    assert all(it["questions"] == [q.text for q in QUESTIONS] for it in items)
    assert all(it["nearest_exact"] for it in items)
    (joint,) = own.to_dict()["combined"]
    assert joint["exact"] and joint["pool"] == 6 and joint["tests"] == 1
    assert sorted(joint["recipes"]) == sorted(it["recipe"] for it in items)
    reads = {it["recipe"]: it["nearest_exact"] for it in given.to_dict()["items"]}
    assert reads["last"] is False and reads["sys_end"] is True  # sys_end precedes the question
    assert not given.combined[0].exact and "p not exact" in given.combined[0].text()
