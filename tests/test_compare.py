"""The comparison on synthetic stores (checked against numpy) and on a real one (report)."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from tlpersona.analyses import metrics as M
from tlpersona.analyses.compare import CompareConfig, compare
from tlpersona.analyses.controls import noise_floor
from tlpersona.analyses.report import write_report
from tlpersona.cache import StoreWriter, open_store
from tlpersona.cache.seed_layout import export_seed, read_seed
from tlpersona.positions import parse_position

LAYERS = [2, 5]


def write_synthetic(path, n_p=12, n_q=8, d=10, seed=0):
    """A store whose recipes share structure: last and prompt_mean are noisy rotations of one
    persona geometry, sys_end is unrelated. prompt_mean/no_last satisfy the B* identity."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_p, 1, len(LAYERS), d, generator=g)
    last = base + 0.1 * torch.randn(n_p, n_q, len(LAYERS), d, generator=g)
    no_last = 2 * base + 0.1 * torch.randn(n_p, n_q, len(LAYERS), d, generator=g)
    n_tok = torch.randint(5, 20, (n_p, n_q), generator=g).float()
    pm = ((n_tok[..., None, None] - 1) * no_last + last) / n_tok[..., None, None]
    sys_end = torch.randn(n_p, len(LAYERS), d, generator=g)
    per_q = {"last": last, "prompt_mean": pm, "prompt_mean_no_last": no_last}
    positions = ["last", "prompt_mean", "prompt_mean_no_last", "sys_end"]
    prov = {"personas": [f"p{i}" for i in range(n_p)], "questions": [str(i) for i in range(n_q)],
            "layers": LAYERS, "positions": positions, "prompt_index": 0}
    w = StoreWriter(path, prov, {"d_model": d})
    for i in range(n_p):
        t = {"sys_end/centroid": sys_end[i]}
        for k, v in per_q.items():
            t[f"{k}/centroid"] = v[i].mean(0)
            t[f"{k}/per_question"] = v[i].half()
            t[f"{k}/valid"] = torch.ones(n_q, dtype=torch.uint8)
        t["prompt_mean/n_tokens"] = n_tok[i]
        t["prompt_mean_no_last/n_tokens"] = n_tok[i] - 1
        w.write_part(i, t)
    w.finalize()
    return open_store(path)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "s")


@pytest.fixture(scope="module")
def result(synth):
    return compare(synth, CompareConfig(n_perm=99, n_splits=4))


def test_cells_match_numpy(synth, result):
    assert len(result["cells"]) == 6 * len(LAYERS)
    cell = next(c for c in result["cells"] if c["layer"] == 5 and c["pair"] == ["last", "prompt_mean"])
    x = synth.centroids("last")[:, 1].double().numpy()
    y = synth.centroids("prompt_mean")[:, 1].double().numpy()
    cos = np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(x, y, strict=True)])
    assert cell["per_persona_cos"]["mean"] == pytest.approx(cos.mean())
    assert cell["per_persona_cos"]["min"] == pytest.approx(cos.min())
    assert cell["per_persona_cos"]["p5"] == pytest.approx(np.percentile(cos, 5))
    iu = np.triu_indices(12, k=1)
    xc, yc = x - x.mean(0), y - y.mean(0)
    mx = (xc / np.linalg.norm(xc, axis=1, keepdims=True)) @ (xc / np.linalg.norm(xc, axis=1, keepdims=True)).T
    my = (yc / np.linalg.norm(yc, axis=1, keepdims=True)) @ (yc / np.linalg.norm(yc, axis=1, keepdims=True)).T
    assert cell["matrix_mc"]["pearson"] == pytest.approx(stats.pearsonr(mx[iu], my[iu])[0], abs=1e-9)
    assert cell["matrix_mc"]["spearman"] == pytest.approx(stats.spearmanr(mx[iu], my[iu])[0], abs=1e-9)
    assert 1 / 100 <= cell["mantel_p"] <= 1
    assert cell["mantel_p"] == pytest.approx(1 / 100)  # planted shared geometry
    assert cell["spread"]["spearman"] is not None
    assert cell["verdict"] in {"PASS", "GREY", "KILL"}
    assert result["min_attainable_p"] == pytest.approx(1 / 100)


def test_question_invariant_recipes_get_na_not_numbers(result):
    cell = next(c for c in result["cells"] if "sys_end" in c["pair"])
    assert cell["spread"]["spearman"] is None
    assert "question-invariant" in cell["spread"]["reason"]
    assert result["noise_floor"]["sys_end"]["2"]["exact"] is True
    assert result["noise_floor"]["last"]["2"]["exact"] is False


def test_noise_floor_matches_explicit_split():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(6, 10, 4)).astype(np.float32)
    valid = np.ones((6, 10), bool)
    iu = np.triu_indices(6, k=1)
    got = noise_floor(v, valid, 1, seed=11, iu=iu)
    perm = np.random.default_rng(11).permutation(10)
    a, b = v[:, perm[:5]].mean(1), v[:, perm[5:]].mean(1)
    cos = M.rowwise_cos(a, b)
    assert got["per_persona_cos_mean"] == pytest.approx(cos.mean(), rel=1e-5)
    assert got["per_persona_cos_min"] == pytest.approx(cos.min(), rel=1e-5)
    r = np.corrcoef(M.cos_matrix(M.mean_centre(a))[iu], M.cos_matrix(M.mean_centre(b))[iu])[0, 1]
    assert got["matrix_mc_pearson_mean"] == pytest.approx(r, rel=1e-4)


def test_bstar_identity_detected(result):
    b = result["bstar_check"]
    assert b["available"]
    for row in b["layers"].values():
        assert row["identity_holds"] and row["identity_max_rel_error"] < 5e-3


def test_bstar_identity_failure_is_reported(tmp_path):
    st = write_synthetic(tmp_path / "s", seed=1)
    # break the identity on disk: a different prompt length
    from safetensors.torch import load_file, save_file

    f = tmp_path / "s" / "prompt_mean.safetensors"
    t = load_file(f)
    t["n_tokens"] = t["n_tokens"] + 3
    save_file(t, f)
    st = open_store(tmp_path / "s")
    b = compare(st, CompareConfig(n_perm=9, n_splits=2))["bstar_check"]
    assert not any(r["identity_holds"] for r in b["layers"].values())


def test_overall_partition(result):
    # last and prompt_mean share the planted persona geometry but not their per-question noise,
    # so their spread Spearman keeps them GREY; prompt_mean is built from prompt_mean_no_last.
    cell = next(c for c in result["cells"] if c["pair"] == ["last", "prompt_mean"])
    assert cell["per_persona_cos"]["min"] > 0.95 and cell["matrix_mc"]["pearson"] > 0.9
    assert cell["spread"]["spearman"] < 0.8 and cell["verdict"] == "GREY"
    assert result["overall"]["partition"] == [["prompt_mean", "prompt_mean_no_last"], ["last"],
                                              ["sys_end"]]
    assert not result["overall"]["recipe_robust"]
    assert "{prompt_mean, prompt_mean_no_last} | {last} | {sys_end}" in result["overall"]["sentence"]


def test_seed_layout_round_trip_gives_same_numbers(synth, result, tmp_path):
    export_seed(synth, tmp_path / "seed")
    assert (tmp_path / "seed" / "method_a" / "all_centroids.pt").exists()
    seed_src = read_seed(tmp_path / "seed")
    assert seed_src.positions == sorted(seed_src.positions, key=seed_src.positions.index)
    again = compare(seed_src, CompareConfig(n_perm=99, n_splits=4))
    for c1, c2 in zip(result["cells"], again["cells"], strict=True):
        assert c1["pair"] == c2["pair"]
        assert c1["per_persona_cos"]["mean"] == pytest.approx(c2["per_persona_cos"]["mean"], abs=1e-6)
        assert c1["matrix_mc"]["pearson"] == pytest.approx(c2["matrix_mc"]["pearson"], abs=1e-6)


def test_seed_definitions_equal_plain_numpy(tmp_path):
    """Seed layout in, the seed's definitions out: raw per-persona cos, raw/mc Pearson, raw
    Spearman over the upper triangle, mean-centring over personas."""
    rng = np.random.default_rng(12)
    roles = [f"r{i}" for i in range(9)]
    data = {m: {r: torch.from_numpy(rng.normal(size=(3, 6))).float() for r in roles}
            for m in ("a", "c2")}
    for m, blob in data.items():
        (tmp_path / f"method_{m}").mkdir()
        torch.save(blob, tmp_path / f"method_{m}" / "all_centroids.pt")
        (tmp_path / f"method_{m}" / "metadata.json").write_text(json.dumps({"layers": [4, 8, 12]}))
    res = compare(read_seed(tmp_path), CompareConfig(n_perm=9, n_splits=2, layers=[8]))
    (cell,) = res["cells"]
    x = np.stack([data["a"][r][1].double().numpy() for r in roles])
    y = np.stack([data["c2"][r][1].double().numpy() for r in roles])
    un = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    iu = np.triu_indices(9, k=1)
    cx, cy = un(x) @ un(x).T, un(y) @ un(y).T
    xc, yc = x - x.mean(0), y - y.mean(0)
    assert cell["pair"] == ["last", "sys_end"]
    assert cell["per_persona_cos"]["mean"] == pytest.approx(np.mean(np.sum(un(x) * un(y), 1)))
    assert cell["matrix_raw"]["pearson"] == pytest.approx(np.corrcoef(cx[iu], cy[iu])[0, 1])
    assert cell["matrix_raw"]["spearman"] == pytest.approx(stats.spearmanr(cx[iu], cy[iu])[0])
    mcx, mcy = un(xc) @ un(xc).T, un(yc) @ un(yc).T
    assert cell["matrix_mc"]["pearson"] == pytest.approx(np.corrcoef(mcx[iu], mcy[iu])[0, 1])


def test_seed_pt_loading_refuses_pickled_code(tmp_path):
    import pickle

    from tlpersona.errors import TlpersonaError

    (tmp_path / "method_a").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "method_a" / "all_centroids.pt", "wb") as f:
        pickle.dump({"r": Evil()}, f)
    with pytest.raises(TlpersonaError, match="cannot load safely"):
        read_seed(tmp_path)


def test_report_on_real_store(loaded, tmp_path):
    """End to end on the embedded default: all seven recipes, comparison, report."""
    from tlpersona.data import builtin_personas, builtin_questions
    from tlpersona.extract import ExtractConfig, extract_to_store
    from tlpersona.generate import generate_responses
    from tlpersona.models import load_hf
    from tlpersona.positions import parse_positions

    personas, questions = builtin_personas()[:5], builtin_questions()[:3]
    hf = load_hf(loaded.info.source, "cpu", torch.float32)
    resp = generate_responses(hf, loaded.tokenizer, personas, questions, 0,
                              tmp_path / "responses.jsonl", 6, 16, progress=False)
    cfg = ExtractConfig(parse_positions("all6"), [7, 29], batch_size=8, progress=False)
    st = open_store(extract_to_store(loaded, cfg, personas, questions, tmp_path / "store", resp))
    res = compare(st, CompareConfig(n_perm=49, n_splits=3))
    report = write_report(res, st, tmp_path / "cmp")
    text = report.read_text()
    assert "| last ~ response_mean | load-bearing |" in text
    assert res["overall"]["sentence"] in text
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert len(saved["cells"]) == 21 * 2
    assert saved["input"]["manifest_hash"] == st.manifest_hash
    for name in ["verdicts.png", "cosines_L29.png", "matrix_r_L29.png", "cos_matrices_L29.png"]:
        data = (tmp_path / "cmp" / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert all(r["identity_holds"] for r in res["bstar_check"]["layers"].values())
    assert parse_position("c3").name in res["positions"]
