"""Shared subspace: against a plain numpy SVD, and on planted structure."""

import numpy as np
import pytest
from test_compare import write_synthetic

from tlpersona.analyses.subspace import SubspaceConfig, subspace
from tlpersona.cache import StoreWriter, open_store


def planted_store(path, n=400, d=30, k=3, m=2, seed=0):
    """Three recipes sharing a k-dim persona geometry (std 4 per dim), each with m dims of its
    own (std 3). Persona coordinates are exactly orthogonal, so the stacked PCA ranks the shared
    dims first (variance 16 against 9/3 = 3) and K > k mixes recipe-specific dims in."""
    import torch

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
    prov = {"personas": [f"p{i}" for i in range(n)], "questions": ["0"], "layers": [4],
            "positions": list(recipes), "prompt_index": 0}
    w = StoreWriter(path, prov, {"d_model": d})
    for i in range(n):
        w.write_part(i, {f"{p}/centroid": torch.from_numpy(x[i : i + 1]).float() for p, x in recipes.items()})
    w.finalize()
    return open_store(path)


def test_components_match_numpy_svd(tmp_path):
    st = write_synthetic(tmp_path / "s")
    res, comps = subspace(st, SubspaceConfig(layers=[5], k_max=5))
    li = st.layer_index(5)
    stacked = []
    for p in res["positions"]:
        x = st.centroids(p)[:, li].double().numpy()
        stacked.append(x - x.mean(0))
    stacked = np.concatenate(stacked)
    _, sv, vt = np.linalg.svd(stacked, full_matrices=False)
    for j in range(5):
        assert abs(abs(comps[5][j] @ vt[j]) - 1) < 1e-8
    ratio = sv**2 / np.sum(sv**2)
    np.testing.assert_allclose(res["layers"][0]["explained_variance_ratio"], ratio[:5], rtol=1e-8)


def test_planted_shared_subspace_is_recovered(tmp_path):
    st = planted_store(tmp_path / "p")
    res, comps = subspace(st, SubspaceConfig(k_max=10))
    (layer,) = res["layers"]
    assert layer["k_found"] == 3
    at3 = layer["curve"][2]["pairs"]
    assert all(v["cos_min"] > 0.99 and v["mc_r"] > 0.99 for v in at3.values())
    assert layer["k_largest_passing"] == 3
    # held out (PCs from 200 personas, scored on the other 200): agreement up to K=3, not beyond
    held = layer["held_out_curve"]
    assert all(v["cos_min"] > 0.95 and v["mc_r"] > 0.99 for v in held[2]["pairs"].values())
    assert min(v["cos_min"] for v in held[3]["pairs"].values()) < 0.85
    assert layer["k_largest_passing_held_out"] == 3
    assert layer["held_out"] == {"n_fit": 200, "n_scored": 200}
    # the three shared PCs hold each recipe's shared share (48 of 66) of its variance
    for v in layer["variance"].values():
        assert abs(v["shared_cumulative"][2] - 48 / 66) < 1e-3
        assert v["own_cumulative"][4] > 0.999


def test_one_dimension_is_trivially_agreeable(tmp_path):
    st = planted_store(tmp_path / "p", seed=1)
    res, _ = subspace(st, SubspaceConfig(k_max=4))
    first = res["layers"][0]["curve"][0]["pairs"]
    # 1-D projections are scalars: every per-persona cosine is exactly +1 or -1
    assert all(abs(abs(v["cos_min"]) - 1) < 1e-9 for v in first.values())
    assert all(np.isnan(v["mc_r"]) for v in first.values())


def test_needs_two_positions(tmp_path):
    from tlpersona.errors import TlpersonaError

    st = planted_store(tmp_path / "p")
    with pytest.raises(TlpersonaError, match="at least two positions"):
        subspace(st, SubspaceConfig(positions=["last"]))
