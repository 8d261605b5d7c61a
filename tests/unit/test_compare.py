"""The comparison on synthetic stores (checked against numpy) and on a real one (report)."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch
from factories import SYNTH_LAYERS as LAYERS
from factories import centroid_store, per_question_store, write_synthetic
from scipy import stats

from tlpersona.analyses import metrics as M
from tlpersona.analyses.compare import CompareConfig, compare
from tlpersona.analyses.compare.result import CompareResult, Thresholds
from tlpersona.analyses.compare.verdicts import _ALIAS, LOAD_BEARING
from tlpersona.analyses.controls import noise_floor
from tlpersona.cache import StoreWriter, open_store
from tlpersona.cache.seed_layout import export_seed, read_seed
from tlpersona.chat.positions import parse_position
from tlpersona.report.compare import write_report


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


def test_noise_floor_min_is_the_minimum_and_spearman_brown():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(6, 10, 4)).astype(np.float32) + 1.0
    iu = np.triu_indices(6, k=1)
    got = noise_floor(v, np.ones((6, 10), bool), 3, seed=2, iu=iu)
    mins, rs = [], []
    split_rng = np.random.default_rng(2)
    for perm in (split_rng.permutation(10) for _ in range(3)):
        a, b = v[:, perm[:5]].mean(1), v[:, perm[5:]].mean(1)
        mins.append(M.rowwise_cos(a, b).min())
        rs.append(np.corrcoef(M.cos_matrix(M.mean_centre(a))[iu], M.cos_matrix(M.mean_centre(b))[iu])[0, 1])
    assert got["per_persona_cos_min"] == pytest.approx(min(mins), rel=1e-5)
    assert got["per_persona_cos_min_split_mean"] == pytest.approx(np.mean(mins), rel=1e-5)
    r = np.mean(rs)
    assert got["matrix_mc_pearson_full"] == pytest.approx(2 * r / (1 + r), rel=1e-4)


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


def test_overall_partition(synth, result):
    # last and prompt_mean share the planted persona geometry but not their per-question noise:
    # the spread Spearman is low, which is descriptive by default and gates only on request.
    cell = next(c for c in result["cells"] if c["pair"] == ["last", "prompt_mean"])
    assert cell["per_persona_cos"]["min"] > 0.95 and cell["matrix_mc"]["pearson"] > 0.9
    assert cell["spread"]["spearman"] < 0.8 and cell["verdict"] == "PASS"
    assert result["overall"]["partition"] == [["last", "prompt_mean", "prompt_mean_no_last"],
                                              ["sys_end"]]
    # one load-bearing pair (A~B*) compared and passing is not robustness across recipes
    assert not result["overall"]["recipe_robust"]
    assert "1 of 5 load-bearing pairs" in result["overall"]["sentence"]
    assert "{last, prompt_mean, prompt_mean_no_last} | {sys_end}" in result["overall"]["sentence"]
    gated = compare(synth, CompareConfig(n_perm=99, n_splits=4, n_null=3,
                                         thresholds=Thresholds(gate_spread=True)))
    cell = next(c for c in gated["cells"] if c["pair"] == ["last", "prompt_mean"])
    assert cell["verdict"] == "GREY"
    assert gated["overall"]["partition"] == [["prompt_mean", "prompt_mean_no_last"], ["last"],
                                             ["sys_end"]]


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
    from tlpersona.chat.positions import parse_positions
    from tlpersona.data import builtin_personas, builtin_questions
    from tlpersona.extraction import ExtractConfig, extract_to_store
    from tlpersona.extraction.generation import generate_responses
    from tlpersona.models.loading import load_hf

    personas, questions = builtin_personas()[:5], builtin_questions()[:3]
    hf = load_hf(loaded.info.source, "cpu", torch.float32)
    resp = generate_responses(hf, loaded.tokenizer, personas, questions, 0,
                              tmp_path / "responses.jsonl", 6, 16, progress=False)
    cfg = ExtractConfig(parse_positions("all6"), [7, 29], batch_size=8, progress=False)
    st = open_store(extract_to_store(loaded, cfg, personas, questions, tmp_path / "store", resp))
    from tlpersona.api.results import CompareResult

    res = compare(st, CompareConfig(n_perm=49, n_splits=3))
    report = CompareResult.of(res, st).save(tmp_path / "cmp")
    first, text = report.read_text(), (tmp_path / "cmp" / "details.md").read_text()
    assert "| last ~ response_mean | load-bearing |" in text
    assert res["overall"]["sentence"] in text
    # the first screen: the answer, then every note, before any table
    assert first.index(res["overall"]["answer"]) < first.index("![verdicts]")
    assert all(n in first for n in res["overall"]["notes"]) and "| pair |" not in first
    rows = list(csv.DictReader((tmp_path / "cmp" / "cells.csv").open()))
    assert len(rows) == len(res["cells"]) == 42
    by = {(int(r["layer"]), r["x"], r["y"]): r for r in rows}
    for c in res["cells"]:
        r = by[(c["layer"], *c["pair"])]
        assert float(r["mc_r"]) == c["matrix_mc"]["pearson"] and r["verdict"] == c["verdict"]
        assert float(r["cos_min"]) == c["per_persona_cos"]["min"]
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert len(saved["cells"]) == 21 * 2
    assert saved["input"]["manifest_hash"] == st.manifest_hash
    for name in ["verdicts.png", "cosines_L29.png", "matrix_r_L29.png", "cos_matrices_L29.png"]:
        data = (tmp_path / "cmp" / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert all(r["identity_holds"] for r in res["bstar_check"]["layers"].values())
    assert parse_position("c3").name in res["positions"]


def invariant_store(path, recipes, extra=None):
    """A store of question-invariant positions only (``{position: [persona, layer, d]}``)."""
    n_layers = next(iter(recipes.values())).shape[1]
    return centroid_store(path, recipes, LAYERS[:n_layers], questions=["0", "1"])


def test_groups_are_cliques_not_chains(tmp_path):
    """X~Y and Y~Z pass but X~Z does not: no group may hold both X and Z."""
    rng = np.random.default_rng(0)
    n, d = 12, 40
    v = rng.normal(size=(n, 1, d))
    w = rng.normal(size=(n, 1, d))
    w -= (np.sum(w * v, -1, keepdims=True) / np.sum(v * v, -1, keepdims=True)) * v
    w *= np.linalg.norm(v, axis=-1, keepdims=True) / np.linalg.norm(w, axis=-1, keepdims=True)
    theta = np.arccos(0.97)
    rec = {"sys_start": v * np.cos(theta) + w * np.sin(theta), "sys_end": v,
           "sys_end+1": v * np.cos(theta) - w * np.sin(theta)}
    res = compare(invariant_store(tmp_path / "s", rec),
                  CompareConfig(positions=list(rec), n_perm=49, n_null=5))
    verdicts = {tuple(c["pair"]): c["verdict"] for c in res["cells"]}
    assert verdicts[("sys_start", "sys_end")] == verdicts[("sys_end", "sys_end+1")] == "PASS"
    assert verdicts[("sys_start", "sys_end+1")] != "PASS"
    assert res["overall"]["partition"] == [["sys_start", "sys_end"], ["sys_end", "sys_end+1"]]


def test_cliques_enumerates_maximal_groups():
    from tlpersona.analyses.compare.verdicts import cliques

    nodes = ["a", "b", "c", "d", "e"]
    edges = [("a", "b"), ("b", "c"), ("a", "c"), ("c", "d")]
    assert cliques(nodes, edges) == [["a", "b", "c"], ["c", "d"], ["e"]]


def test_sink_diagnostic_flags_a_planted_first_token_direction(tmp_path):
    """prompt_mean whose persona differences are mostly the sink's weight 1/n: flagged, with
    r(sink coordinate, 1/prompt length) near 1; a recipe without it is not."""
    rng = np.random.default_rng(1)
    n, n_q, d = 10, 4, 30
    sink = np.zeros(d)
    sink[0] = 500.0
    lengths = rng.integers(20, 60, size=(n, n_q)).astype(float)
    rest = rng.normal(size=(n, n_q, 1, d))
    pm = rest * 0.5 + (sink / lengths[..., None])[:, :, None]
    last = rng.normal(size=(n, n_q, 1, d))
    prov = {"personas": [f"p{i}" for i in range(n)], "questions": [str(q) for q in range(n_q)],
            "layers": [2], "positions": ["first", "last", "prompt_mean"], "prompt_index": 0}
    w = StoreWriter(tmp_path / "s", prov, {"d_model": d})
    for i in range(n):
        t = {"first/centroid": torch.from_numpy(sink[None]).float()}
        for k, v in {"last": last, "prompt_mean": pm}.items():
            t[f"{k}/centroid"] = torch.from_numpy(v[i].mean(0)).float()
            t[f"{k}/per_question"] = torch.from_numpy(v[i]).half()
            t[f"{k}/valid"] = torch.ones(n_q, dtype=torch.uint8)
        t["prompt_mean/n_tokens"] = torch.from_numpy(lengths[i]).float()
        w.write_part(i, t)
    w.finalize()
    res = compare(open_store(tmp_path / "s"), CompareConfig(n_perm=19, n_splits=2, n_null=3))
    assert res["positions"] == ["last", "prompt_mean"]  # `first` itself is not a recipe
    row = res["sink"]["layers"]["2"]
    xc = pm.mean(1)[:, 0] - pm.mean(1)[:, 0].mean(0)
    assert row["prompt_mean"]["share"] == pytest.approx(np.sum(xc[:, 0] ** 2) / np.sum(xc**2), rel=1e-4)
    assert row["prompt_mean"]["share"] > 0.5 and row["prompt_mean"]["warning"]
    assert row["prompt_mean"]["r_with_inverse_length"] > 0.99
    assert row["last"]["share"] < 0.3 and not row["last"]["warning"]
    first = write_report(res, tmp_path / "cmp").markdown
    text = (tmp_path / "cmp" / "details.md").read_text()
    assert "**Warning:**" in text and "prompt_mean (L2)" in text
    assert "Attention sink: most of the persona variance of prompt_mean (L2)" in first


def test_cells_carry_nulls_ceilings_and_holm(result):
    n_cells = len(result["cells"])
    for c in result["cells"]:
        pc = c["procrustes_cos"]
        assert pc["null_n"] == 100 and 0 < pc["ceiling"] <= 1.0
        # 100 draws cannot reach 0.05 after Holm over 12 cells: the Procrustes p stays
        # uncorrected and descriptive, with no Holm column to misread
        assert pc["null_mean"] < pc["null_p95"] and 0 < pc["p"] <= 1 and "p_holm" not in pc
        assert c["matrix_mc"]["mantel_p"] <= c["matrix_mc"]["mantel_p_holm"]
        assert c["matrix_mc"]["null_p95"] < 0.6
        assert "null_mean" in c["per_persona_cos"]
    # the Holm floor of a permutation p is m/(N+1): with 99 permutations and 12 cells no cell
    # can be called significant, and the summary says so instead
    best = min(c["matrix_mc"]["mantel_p_holm"] for c in result["cells"])
    assert best == pytest.approx(min(1.0, n_cells / 100))
    assert not result["procrustes_corrected"] and not result["permutations_auto"]
    notes = " ".join(result["overall"]["notes"])
    assert "Holm over 12 cells cannot reach p < 0.05 from there: raise the draws to at least 240" in notes
    assert "would need at least 240 draws" in notes
    assert result["min_attainable_p_holm"] == pytest.approx(12 / 100)
    cell = next(c for c in result["cells"] if c["pair"] == ["last", "prompt_mean"])
    assert cell["matrix_mc"]["z"] > 3
    # ceilings: geometric mean of the two recipes' split-half values (invariant recipes: 1)
    fl = {p: v["5"] for p, v in result["noise_floor"].items()}
    want = np.sqrt(fl["last"]["matrix_mc_pearson_full"] * fl["prompt_mean"]["matrix_mc_pearson_full"])
    c5 = next(c for c in result["cells"] if c["pair"] == ["last", "prompt_mean"] and c["layer"] == 5)
    assert c5["ceiling"]["matrix_mc_pearson"] == pytest.approx(want)
    inv = next(c for c in result["cells"] if c["pair"] == ["last", "sys_end"] and c["layer"] == 5)
    half = fl["last"]["procrustes_cos_mean"]  # Spearman-Brown to full size, times 1 for sys_end
    assert inv["ceiling"]["procrustes_cos_mean"] == pytest.approx(np.sqrt(2 * half / (1 + half)))


def test_four_personas_compare_and_say_procrustes_needs_more(tmp_path):
    st = write_synthetic(tmp_path / "s", n_p=4, n_q=4)
    res = compare(st, CompareConfig(n_perm=9, n_splits=2, n_null=3))
    pc = res["cells"][0]["procrustes_cos"]
    assert pc["mean"] is None and "too few personas" in pc["reason"]
    assert "4 personas the nulls are wide" in " ".join(res["overall"]["notes"])


def test_foreign_method_b_is_the_seed_response_span(tmp_path):
    """Other code's method_b averaged the closing tokens too: it is read as response_mean_seed
    (recipe B for the load-bearing tags), never as our response_mean."""
    rng = np.random.default_rng(3)
    roles = [f"r{i}" for i in range(6)]
    for m in ("a", "b"):
        (tmp_path / f"method_{m}").mkdir()
        torch.save({r: torch.from_numpy(rng.normal(size=(2, 5))).float() for r in roles},
                   tmp_path / f"method_{m}" / "all_centroids.pt")
    src = read_seed(tmp_path)
    assert src.positions == ["last", "response_mean_seed"]
    res = compare(src, CompareConfig(n_perm=9, n_splits=2, n_null=2))
    assert {c["tag"] for c in res["cells"]} == {"load-bearing"}


def test_robustness_counts_recipe_pairs_not_position_pairs(tmp_path):
    """Both response spans are recipe B: last~response_mean and last~response_mean_seed are one
    load-bearing pair. Four recipes without C1 cover 3 of the 5 pairs, never robustness."""
    rng = np.random.default_rng(5)
    v = rng.normal(size=(8, 1, 12)) + 2.0
    names = ["last", "response_mean", "response_mean_seed", "prompt_mean"]
    res = compare(invariant_store(tmp_path / "s", {p: v for p in names}),
                  CompareConfig(positions=names, n_perm=99, n_null=3))
    assert all(c["verdict"] == "PASS" for c in res["cells"])
    covered = {frozenset(_ALIAS[p] for p in c["pair"]) for c in res["cells"]} & LOAD_BEARING
    assert len(covered) == 3
    assert not res["overall"]["recipe_robust"]
    assert f"Only {len(covered)} of 5 load-bearing pairs" in res["overall"]["sentence"]


@pytest.fixture(scope="module")
def same_but_noisy(tmp_path_factory):
    """last and prompt_mean: the same planted persona vectors, each with its own per-question
    noise (what a ceiling should predict); raw_system_last and response_mean: unrelated to each
    other and almost noiseless."""
    rng = np.random.default_rng(21)
    n, n_q, d = 24, 16, 30
    basis = np.linalg.qr(rng.normal(size=(d, 6)))[0]

    def geometry():
        return 2.0 * rng.normal(size=(n, 6)) @ basis.T + 3.0

    s = geometry()
    rec = {p: s[:, None] + 3.0 * rng.normal(size=(n, n_q, d)) for p in ("last", "prompt_mean")}
    for p in ("raw_system_last", "response_mean"):
        rec[p] = geometry()[:, None] + 0.01 * rng.normal(size=(n, n_q, d))
    st = per_question_store(tmp_path_factory.mktemp("noisy") / "s", rec)
    return compare(st, CompareConfig(n_perm=99, n_splits=4, n_null=3))


def test_ceilings_predict_what_identical_noisy_recipes_reach(same_but_noisy):
    """The statistics are computed on full-size centroids, so the ceilings must be too: for two
    recipes with the same persona vectors, each ceiling is close to the observed value, where
    the half-size split-half values sit far below it."""
    res = same_but_noisy
    (cell,) = [c for c in res["cells"] if c["pair"] == ["last", "prompt_mean"]]
    fl = [res["noise_floor"][p][str(LAYERS[0])] for p in cell["pair"]]
    half = {k: np.sqrt(fl[0][k] * fl[1][k]) for k in ("per_persona_cos_mean", "procrustes_cos_mean")}
    sb = {k: 2 * v / (1 + v) for k, v in half.items()}  # geometric mean of SB ~ SB of geometric mean
    obs = {"per_persona_cos_mean": cell["per_persona_cos"]["mean"],
           "procrustes_cos_mean": cell["procrustes_cos"]["mean"]}
    for key, tol in [("per_persona_cos_mean", 0.01), ("procrustes_cos_mean", 0.1)]:
        assert abs(cell["ceiling"][key] - obs[key]) < tol
        assert abs(half[key] - obs[key]) > tol  # the half-size value is no ceiling here
        assert cell["ceiling"][key] == pytest.approx(sb[key], abs=0.02)
    assert cell["procrustes_cos"]["ceiling"] == cell["ceiling"]["procrustes_cos_mean"]
    assert abs(cell["ceiling"]["per_persona_cos_min"] - cell["per_persona_cos"]["min"]) < 0.05
    assert abs(cell["ceiling"]["matrix_mc_pearson"] - cell["matrix_mc"]["pearson"]) < 0.2


def test_failing_at_the_noise_ceiling_is_not_called_a_difference(same_but_noisy, tmp_path):
    """Identical persona vectors sampled so noisily that their own ceiling is below the KILL
    bound are KILLed, but marked as within noise and said to be so; clean unrelated recipes
    are KILLed as beyond noise; every cell that does not pass carries a mark."""
    res = same_but_noisy
    th = Thresholds()
    cell = {tuple(c["pair"]): c for c in res["cells"]}
    same, unrelated = cell[("last", "prompt_mean")], cell[("response_mean", "raw_system_last")]
    assert same["verdict"] == unrelated["verdict"] == "KILL"
    assert same["ceiling"]["matrix_mc_pearson"] < th.kill_mc_r
    assert same["noise_mark"] == "noise" and unrelated["noise_mark"] == "beyond noise"
    assert same["within_noise"] and not unrelated["within_noise"]  # the descriptive rule
    assert all(c["noise_mark"] is None for c in res["cells"] if c["verdict"] == "PASS")
    assert all(c["noise_mark"] for c in res["cells"] if c["verdict"] != "PASS")
    lb_noisy = sum(c["noise_mark"] == "noise" for c in res["cells"] if c["tag"] == "load-bearing")
    said = f"{lb_noisy} load-bearing cell(s) fail within sampling error of what identical recipes"
    assert lb_noisy > 0 and said in " ".join(res["overall"]["notes"])


def test_min_cosine_null_matches_every_relabelling(tmp_path):
    """Unrelated recipes on a large shared offset: the minimum per-persona cosine is high for
    any pairing, and its null says so. Checked against all 5! relabellings."""
    rng = np.random.default_rng(8)
    n, d = 5, 16
    off = 6 * rng.normal(size=d)
    x, y = (rng.normal(size=(n, 1, d)) + off for _ in range(2))
    res = compare(invariant_store(tmp_path / "s", {"sys_end": x, "raw_system_last": y}),
                  CompareConfig(n_perm=1999, n_null=3))
    (cell,) = res["cells"]
    c = M.unit(x[:, 0]) @ M.unit(y[:, 0]).T
    mins = np.array([min(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))])
    got = cell["per_persona_cos"]
    assert got["null_min_mean"] == pytest.approx(mins.mean(), abs=0.005)
    assert got["null_min_p95"] == pytest.approx(np.percentile(mins, 95), abs=0.01)
    assert got["min"] > 0.9 and got["min"] < got["null_min_p95"] + 0.05  # no better than chance
    p5s = np.array([np.percentile([c[i, p[i]] for i in range(n)], 5)
                    for p in itertools.permutations(range(n))])
    assert got["null_p5_mean"] == pytest.approx(p5s.mean(), abs=0.005)
    assert got["null_p5_p95"] == pytest.approx(np.percentile(p5s, 95), abs=0.01)


def test_a_constant_geometry_has_no_mantel_p_and_cannot_pass(tmp_path):
    """A recipe whose centroids are the same for every persona has no persona geometry: its
    matrix r and Mantel test are undefined (None; null in results.json, an empty field in
    cells.csv, n/a in details.md), its cells cannot pass and stay out of Holm. A NaN r is
    exceeded by no permuted r, so without the guard such a cell got the smallest p of all."""
    rng = np.random.default_rng(4)
    n, d = 8, 16
    off = 10 * rng.normal(size=(1, 1, d))
    v = off + rng.normal(size=(n, 1, d))
    rec = {"sys_end": v, "sys_end+1": v + 0.05 * rng.normal(size=v.shape),
           "raw_system_last": np.repeat(off, n, axis=0)}
    res = compare(invariant_store(tmp_path / "s", rec),
                  CompareConfig(positions=list(rec), permutations=99, null_draws=3))
    flat = [c for c in res.cells if "raw_system_last" in c.pair]
    (real,) = [c for c in res.cells if "raw_system_last" not in c.pair]
    assert len(flat) == 2
    for c in flat:
        for m in (c.matrix_mc, c.matrix_raw):
            assert m.pearson is m.spearman is m.mantel_p is m.mantel_p_holm is None
        assert c.mantel_p is None and c.cos_min > Thresholds().pass_min_cos
        assert c.verdict == "GREY" and c.failed_bounds == ["mc r undefined (constant geometry)"]
        assert c.noise_mark == "inconclusive" and not c.within_noise
        assert c.cka_linear is c.cka_debiased is c.cka_linear_p is None
    assert real.verdict == "PASS" and real.mc_r_p == pytest.approx(1 / 100)
    assert real.mc_r_p_holm == real.mc_r_p  # a family of one: the constant cells are not in it
    said = [s for s in res.notes if s.startswith("2 cell(s) compare a recipe whose persona")]
    assert len(said) == 1 and "L2 sys_end~raw_system_last" in said[0]
    assert "1/3 cells beyond chance" in res.answer

    res.save(tmp_path / "out")
    saved = {tuple(c["pair"]): c for c in json.loads((tmp_path / "out" / "results.json")
                                                      .read_text())["cells"]}
    rows = {(r["x"], r["y"]): r for r in csv.DictReader((tmp_path / "out" / "cells.csv").open())}
    details = (tmp_path / "out" / "details.md").read_text()
    for c in flat:
        assert saved[c.pair]["mantel_p"] is None and saved[c.pair]["matrix_mc"]["pearson"] is None
        assert rows[c.pair]["mc_r_p"] == rows[c.pair]["mc_r"] == rows[c.pair]["raw_r_p"] == ""
        (line,) = [t for t in details.splitlines() if t.startswith(f"| {c.x} ~ {c.y} | ")
                   and "**GREY**" in t]
        # raw r, mc r (each with its null p95), the ceiling (exact recipes: 1), Spearman, Mantel p
        assert "| n/a (n/a) | n/a (n/a) | 1.000 | n/a | n/a (n/a) |" in line
    assert CompareResult.load(tmp_path / "out").cells == res.cells
