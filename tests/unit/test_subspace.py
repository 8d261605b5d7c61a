"""Shared subspace: against a plain numpy SVD, and on planted structure."""

import numpy as np
import pytest
from factories import harder_planted, recipes_store, write_synthetic

from tlpersona.analyses.subspace import SubspaceConfig, subspace


def planted_store(path, n=400, d=30, k=3, m=2, seed=0):
    """Three recipes sharing a k-dim persona geometry (std 4 per dim), each with m dims of its
    own (std 3). Persona coordinates are exactly orthogonal, so the stacked PCA ranks the shared
    dims first (variance 16 against 9/3 = 3) and K > k mixes recipe-specific dims in."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    coords = rng.normal(size=(n, k + 3 * m))
    q, _ = np.linalg.qr(coords - coords.mean(0))
    q *= np.sqrt(n)
    shared = 4.0 * q[:, :k] @ basis[:, :k].T
    recipes = {}
    for r, pos in enumerate(["last", "sys_end", "sys_end+1"]):
        cols = slice(k + r * m, k + (r + 1) * m)
        recipes[pos] = shared + 3.0 * q[:, cols] @ basis[:, cols].T + 5.0
    return recipes_store(path, recipes)


def test_components_match_numpy_svd(tmp_path):
    st = write_synthetic(tmp_path / "s")
    res = subspace(st, SubspaceConfig(layers=[5], k_max=5))
    comps = res.components
    assert res["input"]["manifest_hash"] == st.manifest_hash and res["seed"] == 0
    li = st.layer_index(5)
    stacked = []
    for p in res["positions"]:
        x = st.centroids(p)[:, li].double().numpy()
        stacked.append((x - x.mean(0)) / np.linalg.norm(x - x.mean(0)))  # unit total variance
    stacked = np.concatenate(stacked)
    _, sv, vt = np.linalg.svd(stacked, full_matrices=False)
    for j in range(5):
        assert abs(abs(comps[5][j] @ vt[j]) - 1) < 1e-8
    ratio = sv**2 / np.sum(sv**2)
    np.testing.assert_allclose(res["layers"][0]["explained_variance_ratio"], ratio[:5], rtol=1e-8)


def test_planted_shared_subspace_is_recovered(tmp_path):
    st = planted_store(tmp_path / "p")
    res = subspace(st, SubspaceConfig(k_max=10, n_null=3))
    (layer,) = res["layers"]
    assert layer["k_found"] == layer["k_found_held_out"] == 3
    assert layer["k_found_in_sample"] == 3
    # the relabelled draws are descriptive now: as many as asked for
    assert res["null"] == {"n": 3, "requested": 3, "relabelled": "sys_end+1", "pc_level": 0.05}
    assert res["n_permutations"] == 2000 and res["permutations_requested"] is None
    # each draw breaks two of the three pairs: its PC1 passes at most at the level's rate
    assert len(layer["k_found_null"]) == 3 and set(layer["k_found_null"]) <= {None, 1}
    # no permutation reaches a shared PC's r over 200 personas; the count stops at PC 4,
    # whatever a later PC reaches
    assert layer["per_pc_p_iut"][:3] == pytest.approx([1 / 2001] * 3)
    assert layer["per_pc_p_iut"][3] > 0.05
    assert layer["k_found_p"] == pytest.approx(1 / 2001) == layer["k_found_p_holm"]
    # the three shared PCs order the held-out personas alike in every recipe; the next do not
    for row in layer["per_pc"][:3]:
        assert all(r > 0.99 for r in row["pairs"].values())
    assert all(min(row["pairs"].values()) < 0.5 for row in layer["per_pc"][3:9])
    at3 = layer["curve"][1]["pairs"]  # the curve starts at K = 2
    assert layer["curve"][1]["k"] == 3
    assert all(v["cos_min"] > 0.99 and v["mc_r"] > 0.99 for v in at3.values())
    held = layer["held_out_curve"]
    assert all(v["cos_min"] > 0.9 and v["mc_r"] > 0.99 for v in held[1]["pairs"].values())
    assert min(v["cos_min"] for v in held[2]["pairs"].values()) < 0.85
    assert layer["k_largest_passing"] == 3
    assert layer["held_out"] == {"n_fit": 200, "n_scored": 200}
    for v in layer["variance"].values():
        assert abs(v["shared_cumulative"][2] - 48 / 66) < 1e-3
        assert v["own_cumulative"][4] > 0.999


def noisy_planted(n, k, seed, related=True, d=64, own=3):
    """Three recipes with a k-dim recipe-invariant persona subspace (std 3 down to 2), each
    with its own 3 dims (std 1.5), noise, a large offset and different scales."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    shared = rng.normal(size=(n, k)) * np.linspace(3, 2, k)
    out = {}
    for i, p in enumerate(["last", "sys_end", "sys_end+1"]):
        s = shared if related else rng.normal(size=(n, k)) * np.linspace(3, 2, k)
        cols = slice(k + i * own, k + (i + 1) * own)
        x = s @ basis[:, :k].T + 1.5 * rng.normal(size=(n, own)) @ basis[:, cols].T
        out[p] = (1 + 3 * i) * (x + 0.05 * rng.normal(size=(n, d)) + 4.0 * rng.normal(size=d))
    return out


@pytest.mark.parametrize("n, k", [(26, 5), (26, 2), (100, 5)])
def test_planted_k_is_recovered_and_unrelated_recipes_give_none(tmp_path, n, k):
    """The issue's acceptance rule: a planted k-dim invariant subspace gives k (±1) held out,
    at the built-in persona count too; unrelated recipes give None."""
    for seed in range(3):
        res = subspace(recipes_store(tmp_path / f"r{seed}", noisy_planted(n, k, seed)),
                       SubspaceConfig(k_max=20, n_null=2))
        layer = res["layers"][0]
        assert abs(layer["k_found"] - k) <= 1
        # a draw breaks the pairs with the relabelled recipe: rarely past PC1's test
        assert len(layer["k_found_null"]) == 2 and set(layer["k_found_null"]) <= {None, 1}
        res = subspace(recipes_store(tmp_path / f"u{seed}", noisy_planted(n, k, seed, False)),
                       SubspaceConfig(k_max=20, n_null=0))
        assert res["layers"][0]["k_found"] is None


def test_min_cos_rule_from_k_one_was_unreachable(tmp_path):
    """With a planted 2-dim invariant subspace the per-persona min cosine fails at K = 2 in
    sample (one of 100 personas sits near the origin of the plane, where its own dimensions
    decide its direction): a min-cosine rule finds nothing, the per-PC rule finds 2."""
    res = subspace(recipes_store(tmp_path / "s", noisy_planted(100, 2, 1)),
                   SubspaceConfig(k_max=10, n_null=0))
    layer = res["layers"][0]
    assert layer["curve"][0]["k"] == 2
    assert min(v["cos_min"] for v in layer["curve"][0]["pairs"].values()) < 0.85
    assert layer["k_largest_passing_in_sample"] is None
    assert layer["k_found"] == layer["k_found_in_sample"] == 2


def test_four_personas_and_k_max_one_do_not_crash(tmp_path):
    rec = noisy_planted(4, 2, 0)
    res = subspace(recipes_store(tmp_path / "s", rec), SubspaceConfig(k_max=1, n_null=1))
    layer = res["layers"][0]
    assert layer["curve"] == [] and layer["k_found"] is None  # 2 held-out personas: no r
    res = subspace(recipes_store(tmp_path / "t", noisy_planted(4, 2, 1)), SubspaceConfig())
    assert res["layers"][0]["k_found"] is None


def test_needs_two_positions(tmp_path):
    from tlpersona.errors import TlpersonaError

    st = planted_store(tmp_path / "p")
    with pytest.raises(TlpersonaError, match="at least two positions"):
        subspace(st, SubspaceConfig(positions=["last"]))


def test_high_dimensional_shared_geometry_saturates_and_says_so(tmp_path):
    """Recipes sharing a 200-dim persona geometry at 26 personas: the fit half (13 personas)
    can show 12 directions, all shared, so k_found is 12 flagged as saturated (a lower bound),
    not a count inflated by directions the fit half has no variance along."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(26, 200))
    rec = {p: z + 0.05 * rng.normal(size=(26, 200)) for p in ["last", "sys_end", "sys_end+1"]}
    res = subspace(recipes_store(tmp_path / "s", rec), SubspaceConfig(k_max=50, n_null=2))
    layer = res["layers"][0]
    assert layer["k_found"] == 12 and layer["k_found_saturated"]
    assert len(layer["per_pc"]) == 12
    assert layer["k_found_p"] == pytest.approx(1 / 2001)
    assert layer["k_found_null_p"] == pytest.approx(1 / 3)  # 2 draws, neither reaching 12


def _report(st, tmp_path, **cfg):
    from tlpersona.report.subspace import write_subspace

    res = subspace(st, SubspaceConfig(**cfg))
    return res, write_subspace(res, tmp_path / f"out{len(list(tmp_path.iterdir()))}").markdown


def test_report_calls_k_found_beyond_chance_only_where_holm_allows(tmp_path):
    """The report states a k_found as shared only when PC1's intersection-union p, Holm-adjusted
    over the layers, is below 0.05; the relabelled draws are a descriptive column; a requested
    permutation count is raised to what a PC needs to pass; in-sample counts (no test) stay out
    of the table."""
    st = planted_store(tmp_path / "p", n=26, d=30, k=2)
    res, text = _report(st, tmp_path, k_max=10, n_null=10)
    (layer,) = res["layers"]
    assert layer["k_found"] == 2 and layer["k_found_null_p"] == pytest.approx(1 / 11)
    assert "| 4 | 2, beyond chance (Holm p = 0.0005) | none ×10 (p = 0.091) |" in text
    assert "lower bound" in text and "p < 0.05 (0.05 split over the 1 layer(s)" in text
    assert "2000 label permutations (smallest p 0.0005" in text
    header = next(line for line in text.splitlines() if line.startswith("| layer | k_found"))
    assert "in sample" not in header and "descriptive" in header
    res, text = _report(st, tmp_path, k_max=10, n_null=0, n_perm=5)
    # 5 permutations cannot put p below 0.05: raised to 20, where a PC can pass (1/21)
    assert res["n_permutations"] == 20 and res["permutations_requested"] == 5
    assert "| 4 | 2, beyond chance (Holm p = 0.048) | — |" in text


def test_bad_permutation_count_is_refused(tmp_path):
    from tlpersona.errors import TlpersonaError

    st = planted_store(tmp_path / "p", n=26, d=30, k=2)
    with pytest.raises(TlpersonaError, match="`n_perm` must be at least 1, got 0"):
        subspace(st, SubspaceConfig(n_perm=0))


def test_holm_keeps_every_layer_in_the_family():
    """A layer that found nothing enters Holm with p = 1 (it was tested), for the call and for
    the descriptive relabelled p; a layer without draws has no descriptive p. Leaving the
    empty layers out tested 0.01 at 0.05 / 2."""
    from tlpersona.analyses.kfound import holm_over_layers
    from tlpersona.analyses.stats import holm

    draws = [None] * 99
    layers = [{"k_found_p": 0.01, "k_found_null_p": 0.01, "k_found_null": draws},
              {"k_found_p": None, "k_found_null_p": None, "k_found_null": draws},
              {"k_found_p": 0.03, "k_found_null_p": 0.03, "k_found_null": draws},
              {"k_found_p": 0.002, "k_found_null_p": None, "k_found_null": []}]
    holm_over_layers(layers)
    # four tests: 0.002 * 4, 0.01 * 3, 0.03 * 2, then 1
    assert [lay["k_found_p_holm"] for lay in layers] == pytest.approx([0.03, 1.0, 0.06, 0.008])
    assert [lay["k_found_p_holm"] for lay in layers] == pytest.approx(
        list(holm([0.01, 1.0, 0.03, 0.002])))
    got = [lay["k_found_null_p_holm"] for lay in layers]
    assert got[:3] == pytest.approx([0.03, 1.0, 0.06]) and got[3] is None


def test_gram_route_gives_the_svd_components_and_the_fast_pearson_scipys():
    from scipy import stats
    from sklearn.decomposition import PCA

    from tlpersona.analyses import metrics as M
    from tlpersona.analyses.kfound import top_components

    rng = np.random.default_rng(3)
    for n, d, k in [(40, 300, 12), (91, 576, 50), (30, 20, 10)]:
        x = rng.normal(size=(n, d)) @ np.diag(np.linspace(3, 0.5, d)) + 2.0
        got = top_components(x, k)
        want = PCA(n_components=k, svd_solver="full").fit(x).components_
        np.testing.assert_allclose(np.abs(np.sum(got * want, axis=1)), 1.0, atol=1e-8)
        np.testing.assert_allclose(got @ got.T, np.eye(k), atol=1e-8)
    # rank-deficient rows (fewer independent rows than k): the SVD decides, as before
    low = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 50))
    np.testing.assert_allclose(top_components(low, 5),
                               PCA(n_components=5, svd_solver="full").fit(low).components_)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert M.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert np.isnan(M.pearson(np.ones(5), a[:5]))


POS = ["last", "sys_end", "sys_end+1"]


def _layer_count(raw, n, seed, n_layers, k_max=50):
    """k_found at one layer exactly as subspace() counts it in a run of ``n_layers`` layers,
    and the fixed r > 0.9 rule's count."""
    import itertools

    from tlpersona.analyses.kfound import count_shared, k_found, label_permutations, pc_level, perm_count
    from tlpersona.analyses.subspace import held_out

    pairs = list(itertools.combinations(POS, 2))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    fit, test = perm[: n // 2], perm[n // 2:]
    held, _, scores = held_out(raw, POS, pairs, fit, test, k_max, True, curve=False)
    perms = label_permutations(len(test), perm_count(n_layers, None), rng)
    return count_shared(scores, pairs, perms, pc_level(n_layers)), k_found(held, 0.90)


def test_planted_five_dimensions_at_40_personas_are_counted_as_five_give_or_take_one():
    """At the shipped defaults' level (4 layers: each PC tested at 0.0125 against 2,000 label
    permutations) the per-PC test counts 4–6 of 5 planted shared dimensions at 40 personas
    (20 fit), where the fixed r > 0.9 rule counts fewer."""
    got, fixed = [], []
    for seed in range(3):
        count, old = _layer_count(harder_planted(40, np.random.default_rng(seed)), 40, seed, 4)
        got.append(count.k)
        fixed.append(old or 0)
        assert count.p == pytest.approx(1 / 2001)  # PC1: no permutation in any pair gets near
    assert all(abs(k - 5) <= 1 for k in got), got
    assert sum(got) > sum(fixed), (got, fixed)


def test_answer_says_what_was_found_or_what_it_would_take(tmp_path):
    from tlpersona.analyses.subspace_result import answer

    st = planted_store(tmp_path / "p", n=26, d=30, k=2)
    res = subspace(st, SubspaceConfig(k_max=10))
    text = answer(res)
    assert len(text) <= 220 and text.count(".") <= 3
    assert text.startswith("Shared subspace beyond chance at 1/1 layers: L4 2 (Holm p ≤ 0.0005")
    assert "26 personas, 13 fit" in text
    rng = np.random.default_rng(1)
    res = subspace(recipes_store(tmp_path / "u", harder_planted(26, rng, related=False)),
                   SubspaceConfig(k_max=10))
    layer = res["layers"][0]
    text = answer(res)
    assert layer["k_found"] is None and len(text) <= 220
    assert text.startswith("No shared subspace beyond chance at 1 layer(s): PC1's agreement "
                           f"reached r {min(layer['per_pc'][0]['pairs'].values()):.2f}")
    assert f"{layer['per_pc_threshold'][0]:.2f} needed" in text
    assert "at most 12 PC(s) can be counted, each on 13 held-out personas" in text
    many = {**res, "layers": [{**layer, "layer": i, "k_found": 12, "k_found_saturated": True,
                               "k_found_p_holm": 0.04} for i in range(40)]}
    text = answer(many)
    assert len(text) <= 220 and "40/40 layers, k = 12–12 (some ≥: saturated)" in text
