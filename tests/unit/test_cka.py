"""CKA beside the recipe comparison: against a plain-numpy reference, on planted data, and
without changing any number the comparison already reports."""

import json

import numpy as np
import pytest
from factories import SYNTH_LAYERS as LAYERS
from factories import per_question_store, write_synthetic

from tlpersona.analyses import metrics as M
from tlpersona.analyses.compare import CompareConfig, compare
from tlpersona.analyses.controls import split_masks
from tlpersona.analyses.stats import MantelPermuter
from tlpersona.report.compare import details


def ref_linear_cka(x, y):
    """Kornblith et al. 2019: HSIC of H K H and H L H, the Gram matrices of the raw rows."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, g = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    hsic = lambda a, b: np.trace(a @ b) / (n - 1) ** 2  # noqa: E731
    return hsic(k, g) / np.sqrt(hsic(k, k) * hsic(g, g))


def u_centre(k):
    """Székely & Rizzo's U-centring; ⟨Ũ(K), Ũ(L)⟩ / (n(n-3)) is the unbiased HSIC."""
    n = len(k)
    k = k.astype(float).copy()
    np.fill_diagonal(k, 0)
    row = k.sum(0) / (n - 2)
    out = k - row[:, None] - row[None, :] + k.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(out, 0)
    return out


def ref_debiased_cka(x, y):
    """Debiased CKA from U-centred raw Gram matrices (no mean-centring needed: U-centring
    removes any shift)."""
    a, b = u_centre(x @ x.T), u_centre(y @ y.T)
    return np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))


def null_of(x, y, perms):
    """CKA with ``y``'s persona labels permuted, recomputed from scratch per permutation."""
    return (np.array([ref_linear_cka(x, y[p]) for p in perms]),
            np.array([ref_debiased_cka(x, y[p]) for p in perms]))


def test_cka_matches_plain_numpy_with_its_null():
    rng = np.random.default_rng(0)
    n, d = 11, 7
    x = rng.normal(size=(n, d)) + 4.0
    ys = [x @ rng.normal(size=(d, 5)) + rng.normal(size=(n, 5)), rng.normal(size=(n, 9))]
    perms = np.stack([rng.permutation(n) for _ in range(300)])
    scores = M.cka_scores([M.centred_gram(y) for y in ys], M.centred_gram(x), perms)
    for y, s in zip(ys, scores, strict=True):
        assert M.linear_cka(y, x) == pytest.approx(ref_linear_cka(y, x), abs=1e-12)
        assert M.debiased_cka(y, x) == pytest.approx(ref_debiased_cka(y, x), abs=1e-12)
        assert s.linear.value == pytest.approx(ref_linear_cka(y, x), abs=1e-12)
        assert s.debiased.value == pytest.approx(ref_debiased_cka(y, x), abs=1e-12)
        lin, deb = null_of(y, x, perms)
        for stat, null in ((s.linear, lin), (s.debiased, deb)):
            assert stat.null_mean == pytest.approx(null.mean(), abs=1e-12)
            assert stat.null_sd == pytest.approx(null.std(), abs=1e-12)
            assert stat.null_p95 == pytest.approx(np.percentile(null, 95), abs=1e-12)
            assert stat.p == pytest.approx((1 + np.sum(null >= stat.value - 1e-9)) / 301)


def test_identical_rotated_and_shifted_recipes_give_one():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(15, 12))
    q = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    for y in (x, x @ q, 3.0 * x @ q + 50.0):  # identical, rotated, rescaled and offset
        assert M.linear_cka(x, y) == pytest.approx(1.0, abs=1e-12)
        assert M.debiased_cka(x, y) == pytest.approx(1.0, abs=1e-12)
    # the offset alone would break CKA without mean-centring: the raw Gram's is far from 1
    raw = lambda a, b: np.sum(a @ a.T * (b @ b.T)) / np.linalg.norm(a @ a.T) / np.linalg.norm(b @ b.T)  # noqa: E731
    assert raw(x, x + 50.0) < 0.5


def test_unrelated_recipes_sit_in_their_null():
    rng = np.random.default_rng(2)
    n = 40
    x, y = rng.normal(size=(n, 30)), rng.normal(size=(n, 30))
    perms = np.stack([rng.permutation(n) for _ in range(500)])
    (s,) = M.cka_scores([M.centred_gram(x)], M.centred_gram(y), perms)
    # linear CKA of unrelated data is far above 0 (its bias); the null says where it sits
    assert s.linear.value > 0.3
    assert abs(s.linear.value - s.linear.null_mean) < 3 * s.linear.null_sd
    assert abs(s.debiased.value) < 0.05 and abs(s.debiased.null_mean) < 0.01
    assert s.linear.p > 0.01 and s.debiased.p > 0.01


def test_permutation_p_is_calibrated_on_unrelated_data():
    rng = np.random.default_rng(3)
    reps, n, alpha = 100, 8, 0.05
    perms = np.stack([rng.permutation(n) for _ in range(199)])
    hits = np.zeros(2)
    for _ in range(reps):
        x, y = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
        (s,) = M.cka_scores([M.centred_gram(x)], M.centred_gram(y), perms)
        hits += [s.linear.p < alpha, s.debiased.p < alpha]
    bound = alpha + 3 * np.sqrt(alpha * (1 - alpha) / reps)
    assert np.all(hits / reps <= bound), hits


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("cka") / "s")


def test_comparison_cells_carry_cka_from_the_mantel_draws(synth):
    res = compare(synth, CompareConfig(n_perm=99, n_splits=4, n_null=3))
    li = synth.layer_index(LAYERS[0])
    perms = MantelPermuter(len(synth.personas), 99, 0).perms
    for cell in res["cells"]:
        if cell["layer"] != LAYERS[0]:
            continue
        x, y = (synth.centroids(p)[:, li].double().numpy() for p in cell["pair"])
        cka = cell["cka"]
        assert cka["for_comparability"] and cka["n_perm"] == 99
        lin, deb = null_of(x, y, perms)
        assert cka["linear"]["value"] == pytest.approx(ref_linear_cka(x, y), abs=1e-10)
        assert cka["debiased"]["value"] == pytest.approx(ref_debiased_cka(x, y), abs=1e-10)
        assert cka["linear"]["null_mean"] == pytest.approx(lin.mean(), abs=1e-10)
        assert cka["debiased"]["null_p95"] == pytest.approx(np.percentile(deb, 95), abs=1e-10)
        assert "p_holm" in cka["linear"] and "p_holm" in cka["debiased"]
    # sys_end is question-invariant (reliability 1): c(a, b) = √(r_a r_b) = c(a, sys_end) c(b, sys_end)
    ceil = {(tuple(c["pair"]), k): c["cka"][k]["ceiling"] for c in res["cells"]
            if c["layer"] == LAYERS[0] for k in ("linear", "debiased")}
    for k in ("linear", "debiased"):
        assert ceil[(("last", "prompt_mean"), k)] == pytest.approx(
            ceil[(("last", "sys_end"), k)] * ceil[(("prompt_mean", "sys_end"), k)], abs=1e-12)
        assert ceil[(("last", "sys_end"), k)] < 1.0
    text = "\n".join(details(res, "t"))
    assert "CKA lin / debiased" in text and "for comparability" in text


def test_cka_changes_no_existing_number(synth, monkeypatch):
    """Every statistic, verdict and note is the same with the CKA step stubbed out: it draws
    nothing from the run's generators and changes none of the arrays it shares."""
    cfg = CompareConfig(n_perm=99, n_splits=4, n_null=5)
    with_cka = compare(synth, cfg)
    nan = M.CkaStat(None, None, None, None, None)
    monkeypatch.setattr(M, "cka_scores", lambda kxs, ky, perms, flat=None:
                        [M.CkaScore(nan, nan)] * len(kxs))
    monkeypatch.setattr(M, "split_half_cka", lambda h: M.SplitHalfCka(0.0, 0.0, 0.0))
    without = compare(synth, cfg)
    for r in (with_cka, without):
        for c in r["cells"]:
            assert set(c.pop("cka")) >= {"linear", "debiased"}
    assert json.dumps(with_cka, sort_keys=True, default=str) == json.dumps(
        without, sort_keys=True, default=str)


def test_debiased_ceiling_is_what_identical_noisy_recipes_reach(tmp_path):
    """Two recipes with the same planted persona vectors and their own per-question noise:
    the full-size debiased ceiling predicts their observed debiased CKA, where the half-size
    split-half value sits far below; the half-size linear ceiling sits below its observed."""
    rng = np.random.default_rng(21)
    n, n_q, d = 24, 16, 30
    s = 2.0 * rng.normal(size=(n, 6)) @ np.linalg.qr(rng.normal(size=(d, 6)))[0].T + 3.0
    rec = {p: s[:, None] + 3.0 * rng.normal(size=(n, n_q, d)) for p in ("last", "prompt_mean")}
    res = compare(per_question_store(tmp_path / "s", rec),
                  CompareConfig(n_perm=99, n_splits=8, n_null=3))
    (cka,) = [c["cka"] for c in res["cells"]]
    half = [M.split_half_cka(np.stack([
        rec[p][:, m.astype(bool)].mean(1) for m in split_masks(n_q, 8, 0)], axis=1))
        for p in ("last", "prompt_mean")]
    deb_half = np.sqrt(max(half[0].debiased, 0) * max(half[1].debiased, 0))
    obs = cka["debiased"]["value"]
    assert abs(cka["debiased"]["ceiling"] - obs) < 0.1
    assert obs - deb_half > 0.15
    assert cka["linear"]["ceiling"] == pytest.approx(np.sqrt(half[0].linear * half[1].linear),
                                                     abs=1e-6)
    assert cka["linear"]["ceiling"] < cka["linear"]["value"]
    assert cka["debiased"]["ceiling_size"] == "full" and cka["linear"]["ceiling_size"] == "half"
