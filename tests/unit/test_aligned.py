"""Procrustes-aligned shared subspace: the same persona geometry in a rotated basis per recipe
is found held out; unrelated recipes are not; the alignment never sees the scored personas."""

import itertools

import numpy as np
import pytest
from factories import recipes_store

from tlpersona.analyses.aligned import aligned_per_pc, aligned_rows, report_section
from tlpersona.analyses.subspace import SubspaceConfig, subspace
from tlpersona.errors import TlpersonaError

POS = ["last", "sys_end", "sys_end+1"]
PAIRS = list(itertools.combinations(POS, 2))


def rotated_planted(n, k, seed, related=True, d=64, own=3, own_std=1.0):
    """Three recipes with a k-dim persona geometry (std 3 down to 2) and 3 dims of their own
    (std ``own_std``), each then turned by its own random rotation of the whole residual basis,
    offset and scaled differently."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    shared = rng.normal(size=(n, k)) * np.linspace(3, 2, k)
    out = {}
    for i, p in enumerate(POS):
        s = shared if related else rng.normal(size=(n, k)) * np.linspace(3, 2, k)
        cols = slice(k + i * own, k + (i + 1) * own)
        x = s @ basis[:, :k].T + own_std * rng.normal(size=(n, own)) @ basis[:, cols].T
        x = x + 0.05 * rng.normal(size=(n, d))
        rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
        out[p] = (1 + 3 * i) * (x @ rot + 4.0 * rng.normal(size=d))
    return out


def test_exact_rotated_copies_align_onto_each_other_on_held_out_personas():
    """Recipes that are one configuration rotated, scaled and offset: the maps fitted on the
    fit half put the other half's rows on top of each other (so the scores agree exactly)."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 40))
    raw = {p: (1 + i) * z @ np.linalg.qr(rng.normal(size=(40, 40)))[0] + rng.normal(size=40)
           for i, p in enumerate(POS)}
    perm = rng.permutation(30)
    fit_rows, test_rows = aligned_rows(raw, POS, perm[:15], perm[15:], unit_norm=True)
    for p in POS[1:]:
        np.testing.assert_allclose(fit_rows[p], fit_rows[POS[0]], atol=1e-9)
        np.testing.assert_allclose(test_rows[p], test_rows[POS[0]], atol=1e-9)
    # independently: the test rows keep every pairwise distance of the centred, scaled originals
    c = raw[POS[1]] - raw[POS[1]][perm[:15]].mean(0)
    c /= np.linalg.norm(c[perm[:15]])
    want = np.linalg.norm(c[perm[15:], None] - c[None, perm[15:]], axis=-1)
    got = test_rows[POS[1]]
    np.testing.assert_allclose(np.linalg.norm(got[:, None] - got[None], axis=-1), want, atol=1e-9)


@pytest.mark.parametrize("k", [2, 5])
def test_rotated_shared_geometry_is_found_by_the_aligned_variant_only(tmp_path, k):
    for seed in range(3):
        st = recipes_store(tmp_path / f"r{seed}", rotated_planted(26, k, seed))
        res = subspace(st, SubspaceConfig(k_max=20, n_null=2, align="procrustes", seed=seed))
        layer = res["layers"][0]
        assert res["align"] == "procrustes"
        assert abs(layer["aligned"]["k_found"] - k) <= 1
        assert (layer["k_found"] or 0) < layer["aligned"]["k_found"]  # plain joint PCA does worse
        null = layer["aligned"]["k_found_null"]  # descriptive: as many as asked
        assert len(null) == 2 and set(null) <= {None, 1}
        assert layer["aligned"]["k_found_p"] == pytest.approx(1 / 2001)
        assert layer["aligned"]["n_fit"] == 13 and layer["aligned"]["rank"] == 12


@pytest.mark.parametrize("n", [8, 26])
def test_unrelated_recipes_give_no_aligned_subspace(tmp_path, n):
    """Each PC is tested at 0.05 (one layer), so an unrelated layer reaches k_found ≥ 1 with
    probability ≤ 0.05: at most one of six here, and only its PC1."""
    found = []
    for seed in range(6):
        st = recipes_store(tmp_path / f"u{seed}", rotated_planted(n, 3, seed, related=False))
        res = subspace(st, SubspaceConfig(k_max=20, n_null=2, align="procrustes", seed=seed))
        found.append(res["layers"][0]["aligned"]["k_found"])
    assert sum(k is not None for k in found) <= 1 and all(k in (None, 1) for k in found), found


def test_aligned_held_out_scores_are_centred_on_zero_for_unrelated_recipes():
    """Were the alignment or the PCA to see the scored personas, unrelated recipes would agree
    on them; held out, per-PC r averages 0 and exceeds 0.9 about as often as chance (4 scored
    personas: r is uniform on [-1, 1] under the null, so 5 %)."""
    rs = []
    for seed in range(40):
        raw = rotated_planted(8, 2, seed, related=False)
        perm = np.random.default_rng(seed).permutation(8)
        rs += [v for row in aligned_per_pc(raw, POS, PAIRS, perm[:4], perm[4:], True)
               for v in row["pairs"].values()]
    rs = np.array(rs)
    assert abs(rs.mean()) < 0.06 and np.mean(rs > 0.9) < 0.1
    # fitted on the scored personas, the same recipes look related on the first PCs
    every = np.arange(8)
    pc1 = [v for seed in range(10) for v in aligned_per_pc(
        rotated_planted(8, 2, seed, related=False), POS, PAIRS, every, every, True)[0]["pairs"].values()]
    assert np.mean(pc1) > 0.5


def test_variant_is_named_in_the_report_and_bad_values_are_refused(tmp_path):
    st = recipes_store(tmp_path / "s", rotated_planted(26, 2, 0))
    plain = subspace(st, SubspaceConfig(k_max=5, n_null=0))
    assert plain["align"] == "none" and "aligned" not in plain["layers"][0]
    assert "plain joint PCA only" in "\n".join(report_section(plain))
    res = subspace(st, SubspaceConfig(k_max=5, n_null=0, align="procrustes"))
    text = "\n".join(report_section(res))
    # no relabelled draw: the test still runs (it permutes labels, it needs no refit)
    assert "Rotation-aligned shared subspace" in text
    assert "| 4 | 2, beyond chance (Holm p = 0.0005) | — | 12 |" in text
    assert "lower bound" in text and "in sample" not in text.split("|---|")[1]
    # 39 relabellings, none reaching k: descriptive p = 1/40; the call is the test's
    res = subspace(st, SubspaceConfig(k_max=5, n_null=39, align="procrustes"))
    text = "\n".join(report_section(res))
    null = res["layers"][0]["aligned"]["k_found_null"]
    assert len(null) == 39 and all((k or 0) < 2 for k in null)  # none reaches k: p = 1/40
    assert "| 4 | 2, beyond chance (Holm p = 0.0005) | none ×" in text and "(p = 0.025) | 12 |" in text
    with pytest.raises(TlpersonaError, match="align must be one of none, procrustes"):
        subspace(st, SubspaceConfig(align="cca"))
