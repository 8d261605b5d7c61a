"""Cross-model comparison (`tlpersona compare STORE_A --against STORE_B`): planted stores of one
persona geometry in two models (rotated, embedded in another width) are called the same, unrelated
ones are called beyond chance at most at the level, mismatched stores are refused naming the
field, and the statistics equal an independent numpy/scipy computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import allowed
from scipy import stats
from scipy.linalg import orthogonal_procrustes

from tlpersona.analyses.controls import spearman_brown
from tlpersona.analyses.cross_model import CrossModelConfig, compare_models
from tlpersona.cache import StoreWriter, open_store
from tlpersona.errors import TlpersonaError

LAYERS = [1, 2, 3]
PER_QUESTION, INVARIANT = "last", "sys_end"


def _orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """``[k, d]`` orthonormal rows: a k-dimensional geometry placed in a d-wide residual."""
    q, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return q.T


def geometry(rng: np.random.Generator, n: int, k: int = 6, n_layers: int = len(LAYERS)
             ) -> np.ndarray:
    """``[persona, layer, k]`` persona coordinates; the layers share most of it."""
    base = rng.normal(size=(n, 1, k))
    return base + 0.4 * rng.normal(size=(n, n_layers, k))


def model_vectors(rng: np.random.Generator, geo: np.ndarray, d: int, n_q: int, noise: float,
                  offset: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """One model's view of ``geo``: embedded in its own random d-wide basis with its own shared
    offset, per-question vectors ``[persona, question, layer, d]`` with independent noise, and
    question-invariant centroids ``[persona, layer, d]`` (the geometry itself)."""
    emb = _orthonormal(rng, d, geo.shape[-1])
    x = geo @ emb + offset * rng.normal(size=(1, 1, d)) / math.sqrt(d)
    per_q = x[:, None] + noise * rng.normal(size=(geo.shape[0], n_q, *x.shape[1:])) / math.sqrt(d)
    return per_q, x


def write_store(path: Path, per_q: np.ndarray, inv: np.ndarray, model: str = "m",
                depth: int = 4, **prov_overrides: object) -> Path:
    """A store through the store writer: ``last`` with per-question vectors, ``sys_end``
    question-invariant (centroids only)."""
    n, n_q, n_l, d = per_q.shape
    prov: dict = {"model": model, "model_identity": f"hub:{model}", "dtype": "float32",
                  "layers": LAYERS, "positions": [PER_QUESTION, INVARIANT],
                  "personas": [f"p{i}" for i in range(n)], "persona_hash": "ph",
                  "questions": [f"q{j}" for j in range(n_q)], "question_hash": "qh",
                  "prompt_index": 0, "include_eot": None, "responses_hash": None}
    prov.update(prov_overrides)
    w = StoreWriter(path, prov, {"d_model": d, "n_layers_total": depth})
    pq = torch.as_tensor(per_q, dtype=torch.float32).half()
    for i in range(n):
        w.write_part(i, {f"{PER_QUESTION}/centroid": pq[i].float().mean(0),
                         f"{PER_QUESTION}/per_question": pq[i],
                         f"{PER_QUESTION}/valid": torch.ones(n_q, dtype=torch.uint8),
                         f"{INVARIANT}/centroid": torch.as_tensor(inv[i]).float()})
    w.finalize()
    return path


def planted_pair(tmp: Path, n: int, related: bool, seed: int = 0, d_a: int = 24, d_b: int = 24,
                 n_q: int = 12, noise: float = 0.5) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    geo_a = geometry(rng, n)
    geo_b = geo_a if related else geometry(rng, n)
    a = write_store(tmp / "a", *model_vectors(rng, geo_a, d_a, n_q, noise), model="org/base")
    b = write_store(tmp / "b", *model_vectors(rng, geo_b, d_b, n_q, noise), model="org/instruct")
    return a, b


class MemorySource:
    """Two recipes held in memory behind the store's read interface (the calibration loops
    run hundreds of comparisons): ``last`` from per-question vectors ``[persona, question,
    layer, d]``, ``sys_end`` question-invariant ``[persona, layer, d]``."""

    manifest_hash = "0" * 64

    def __init__(self, per_q: np.ndarray, inv: np.ndarray, model: str):
        self.pq = torch.from_numpy(per_q.astype(np.float32))
        self.inv = torch.from_numpy(inv.astype(np.float32))
        n, n_q, n_l, _ = per_q.shape
        self.personas = [f"p{i}" for i in range(n)]
        self.questions = [f"q{j}" for j in range(n_q)]
        self.layers = list(range(1, n_l + 1))
        self.positions = [PER_QUESTION, INVARIANT]
        self.provenance = {"model": model, "persona_hash": "ph", "question_hash": "qh",
                           "prompt_index": 0}

    def question_invariant(self, position):
        return position == INVARIANT

    def has_per_question(self, position):
        return position == PER_QUESTION

    def centroids(self, position):
        return self.pq.mean(1) if position == PER_QUESTION else self.inv

    def per_question(self, position, layer=None):
        return self.pq

    def per_question_rows(self, position, start, stop):
        return self.pq[start:stop]

    def valid(self, position):
        return torch.ones(len(self.personas), len(self.questions), dtype=torch.bool)

    def n_tokens(self, position):
        return None

    def layer_index(self, layer):
        return self.layers.index(layer)


def memory_pair(n: int, related: bool, seed: int, noise: float = 2.0, n_layers: int = 1,
                d_a: int = 24, d_b: int = 32) -> tuple[MemorySource, MemorySource]:
    rng = np.random.default_rng(seed)
    geo_a = geometry(rng, n, n_layers=n_layers)
    geo_b = geo_a if related else geometry(rng, n, n_layers=n_layers)
    return (MemorySource(*model_vectors(rng, geo_a, d_a, 12, noise), "a"),
            MemorySource(*model_vectors(rng, geo_b, d_b, 12, noise), "b"))


# --- planted agreement ----------------------------------------------------------------------

@pytest.mark.parametrize("d_b", [24, 40], ids=["rotated", "wider"])
def test_the_same_geometry_in_another_basis_is_called_agree(tmp_path, d_b):
    """B holds A's persona geometry in its own random basis (rotated at the same width, or
    embedded in a wider residual), with its own offset and independent per-question noise."""
    a, b = planted_pair(tmp_path, 26, related=True, d_b=d_b, noise=4.0)
    res = compare_models(open_store(a), open_store(b))
    assert len(res.cells) == 6 and all(c.call == "agree" for c in res.cells), res.cells
    assert [r.call for r in res.recipe_answers] == ["agree", "agree"]
    assert res.answer.startswith("Is each recipe's persona geometry the same in org/base (A) "
                                 "and org/instruct (B)? agree for 2 of 2")
    for c in res.cells:
        assert c.mc_r_p_holm < 0.05 and c.mc_r > c.mc_r_null_p95
        assert c.procrustes_null_p95 < 0.3 and c.procrustes_cos > c.procrustes_ceiling - 0.1
        assert c.cka_debiased > c.cka_debiased_null_p95
    inv = [c for c in res.cells if c.recipe == INVARIANT]
    # question-invariant: no noise, the geometry is the same up to rotation: exactly 1
    assert all(c.mc_r == pytest.approx(1, abs=1e-6) and c.mc_r_ceiling == 1.0 for c in inv)
    assert all(c.procrustes_cos == pytest.approx(1, abs=1e-6) for c in inv)
    widths = [n for n in res.notes if "widths differ" in n]
    assert bool(widths) == (d_b != 24)
    assert res.a.d_model == 24 and res.b.d_model == d_b
    assert any(n.startswith("Per-persona cosine is not reported") for n in res.notes)
    assert not any("per_persona" in k or k.startswith("cos_") for k in res.to_dict()["cells"][0])


def test_a_partly_shared_geometry_is_called_differ_yet_related(tmp_path):
    rng = np.random.default_rng(7)
    geo = geometry(rng, 26)
    other = geo.copy()
    other[..., 3:] = geometry(rng, 26)[..., 3:]  # half of the persona dimensions replaced
    a = write_store(tmp_path / "a", *model_vectors(rng, geo, 24, 12, 2.0))
    b = write_store(tmp_path / "b", *model_vectors(rng, other, 32, 12, 2.0))
    res = compare_models(open_store(a), open_store(b))
    assert all(c.call == "differ" and c.mc_r_p_holm < 0.05 for c in res.cells), res.cells
    assert all(c.mc_r < c.mc_r_ceiling for c in res.cells)
    assert "though more alike than shuffled personas" in res.recipe_answers[0].sentence


# --- calibration ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [8, 26])
def test_unrelated_models_are_called_agree_at_most_at_the_level(n):
    """Unrelated geometries: no cell is called agree (family-wise over the run's cells) more
    often than the level, and each cell's uncorrected Mantel and Procrustes p are below 0.05 at
    most at the nominal rate; an independent copy of the geometry is called agree every time
    and differ (anywhere) at most at the level."""
    runs = 150
    agree = 0
    mantel, proc = [], []
    for seed in range(runs):
        res = compare_models(*memory_pair(n, False, seed), CrossModelConfig(seed=seed, n_null=39))
        agree += any(c.call == "agree" for c in res.cells)
        mantel += [c.mc_r_p for c in res.cells]
        proc += [c.procrustes_p for c in res.cells]
    assert agree / runs <= allowed(0.05, runs)
    assert np.mean(np.array(mantel) < 0.05) <= allowed(0.05, len(mantel))
    assert np.mean(np.array(proc) < 0.05) <= allowed(0.05, len(proc))
    same = [compare_models(*memory_pair(n, True, seed, noise=6.0),
                           CrossModelConfig(seed=seed, n_null=39)) for seed in range(60)]
    assert np.mean([any(c.call == "differ" for c in r.cells) for r in same]) <= allowed(0.05, 60)
    assert np.mean([all(c.call == "agree" for c in r.cells) for r in same]) > 0.9


# --- the numbers against an independent computation -----------------------------------------

def _tri(x: np.ndarray) -> np.ndarray:
    """Upper triangle of the cosine matrix of ``x`` centred over personas."""
    xc = x - x.mean(0)
    u = xc / np.linalg.norm(xc, axis=1, keepdims=True)
    return (u @ u.T)[np.triu_indices(len(x), 1)]


def _heldout(x: np.ndarray, y: np.ndarray, fit: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosines of the test personas, x rotated onto y by a map fitted on the fit personas in
    each model's own fit-half principal coordinates (an SVD of its centred fit rows)."""
    coords = []
    for z in (x, y):
        mu = z[fit].mean(0)
        _, s, vt = np.linalg.svd(z[fit] - mu, full_matrices=False)
        r = min(int(np.sum(s**2 > s[0] ** 2 * 1e-12)), 32, len(fit) - 1)
        coords.append(((z[fit] - mu) @ vt[:r].T, (z[test] - mu) @ vt[:r].T))
    r = min(coords[0][0].shape[1], coords[1][0].shape[1])
    rot, _ = orthogonal_procrustes(coords[0][0][:, :r], coords[1][0][:, :r])
    p, q = coords[0][1][:, :r] @ rot, coords[1][1][:, :r]
    return np.sum(p * q, 1) / np.linalg.norm(p, axis=1) / np.linalg.norm(q, axis=1)


def _split_half_r(per_q: np.ndarray, n_splits: int, seed: int) -> tuple[float, list[np.ndarray]]:
    """A store's Spearman–Brown split-half r of the mean-centred matrices and every half's
    triangle (halves 2k, 2k + 1 of split k)."""
    rng = np.random.default_rng(seed)
    n_q = per_q.shape[1]
    rs, tris = [], []
    for _ in range(n_splits):
        perm = rng.permutation(n_q)
        h = [per_q[:, perm[: n_q // 2]].mean(1), per_q[:, perm[n_q // 2:]].mean(1)]
        t = [_tri(v) for v in h]
        tris += t
        rs.append(np.corrcoef(*t)[0, 1])
    return spearman_brown(float(np.mean(rs))), tris


def test_the_statistics_equal_an_independent_computation(tmp_path):
    n, seed, n_perm, n_null = 12, 3, 500, 30
    a, b = planted_pair(tmp_path, n, related=True, d_a=20, d_b=36, noise=5.0, seed=11)
    sa, sb = open_store(a), open_store(b)
    res = compare_models(sa, sb, CrossModelConfig(seed=seed, n_perm=n_perm, n_null=n_null,
                                                  n_splits=6))
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(n) for _ in range(n_perm)])
    iu = np.triu_indices(n, 1)
    for k, layer in enumerate(LAYERS):
        li = LAYERS.index(layer)
        for recipe in (PER_QUESTION, INVARIANT):
            c = res.cell(recipe, layer)
            xa = sa.centroids(recipe)[:, li].double().numpy()
            xb = sb.centroids(recipe)[:, li].double().numpy()
            ta, tb = _tri(xa), _tri(xb)
            r = np.corrcoef(ta, tb)[0, 1]
            assert c.mc_r == pytest.approx(r, abs=1e-9)
            assert c.mc_spearman == pytest.approx(stats.spearmanr(ta, tb)[0], abs=1e-9)
            cb = (xb - xb.mean(0)) / np.linalg.norm(xb - xb.mean(0), axis=1, keepdims=True)
            mb = cb @ cb.T
            null = np.array([np.corrcoef(ta, mb[np.ix_(p, p)][iu])[0, 1] for p in perms])
            assert c.mc_r_p == pytest.approx((1 + np.sum(null >= r - 1e-6)) / (n_perm + 1),
                                             abs=2 / (n_perm + 1))
            assert c.mc_r_null_p95 == pytest.approx(np.percentile(null, 95), abs=1e-5)
            # held-out Procrustes: the same halvings of the personas, both ways round
            split_rng = np.random.default_rng(seed + k)
            total = np.zeros(n)
            for _ in range(4):
                p = split_rng.permutation(n)
                f, t = p[: n // 2], p[n // 2:]
                total[t] += _heldout(xa, xb, f, t)
                total[f] += _heldout(xa, xb, t, f)
            assert c.procrustes_cos == pytest.approx(total.mean() / 4, abs=1e-9)
            # linear CKA of the centred Gram matrices, with an explicit centring matrix
            h = np.eye(n) - 1.0 / n
            gk, gl = h @ xa @ xa.T @ h, h @ xb @ xb.T @ h
            assert c.cka_linear == pytest.approx(np.sum(gk * gl) / np.linalg.norm(gk)
                                                 / np.linalg.norm(gl), abs=1e-9)
            if recipe == INVARIANT:
                assert c.mc_r_ceiling == 1.0 and c.mc_r_sd == 0.0
                continue
            # ceiling: geometric mean of the two stores' split-half r; SD over the halves
            pa = sa.per_question(recipe)[:, :, li].double().numpy()
            pb = sb.per_question(recipe)[:, :, li].double().numpy()
            ra, tris_a = _split_half_r(pa, 6, seed)
            rb, tris_b = _split_half_r(pb, 6, seed)
            assert c.mc_r_ceiling == pytest.approx(math.sqrt(ra * rb), abs=1e-6)
            half_r = [np.corrcoef(x, y)[0, 1] for x, y in zip(tris_a, tris_b, strict=True)]
            assert c.mc_r_sd == pytest.approx(np.std(half_r), abs=1e-5)
            z = (r - c.mc_r_ceiling) / c.mc_r_sd
            assert c.mc_r_gap_z == pytest.approx(z, rel=1e-9)
            assert c.mc_r_gap_p == pytest.approx(stats.norm.cdf(z), rel=1e-9)
    ps = [c.mc_r_p for c in res.cells]
    m = len(ps)
    order = np.argsort(ps)
    holm = np.minimum(1, np.maximum.accumulate([(m - i) * ps[j] for i, j in enumerate(order)]))
    assert [res.cells[j].mc_r_p_holm for j in order] == pytest.approx(holm)
    assert res.n_permutations == n_perm and not res.permutations_auto


def test_default_permutations_are_sized_to_the_family(tmp_path):
    a, b = planted_pair(tmp_path, 8, related=True)
    res = compare_models(open_store(a), open_store(b), CrossModelConfig(n_null=5))
    assert res.permutations_auto and res.n_permutations == 1000  # 6 cells: ⌈2·6/0.05⌉ → 1000
    assert res.min_attainable_p_holm == pytest.approx(6 / 1001)
    assert not res.procrustes_corrected and all(c.procrustes_p_holm is None for c in res.cells)
    enough = compare_models(open_store(a), open_store(b), CrossModelConfig(n_null=120))
    assert enough.procrustes_corrected
    assert all(c.procrustes_p_holm is not None for c in enough.cells)


# --- refusals ---------------------------------------------------------------------------------

def _stores(tmp: Path, n: int = 8, n_q: int = 6, **b_prov: object) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    geo = geometry(rng, n)
    a = write_store(tmp / "a", *model_vectors(rng, geo, 16, n_q, 1.0))
    per_q, inv = model_vectors(rng, geo, 16, n_q, 1.0)
    return a, write_store(tmp / "b", per_q, inv, **b_prov)


REFUSED = {
    "persona order": ({"personas": ["p1", "p0", *[f"p{i}" for i in range(2, 8)]]},
                      "field `personas` differs (the same names in another order): entry 1 is "
                      "'p0'"),
    "persona name": ({"personas": ["x0", *[f"p{i}" for i in range(1, 8)]]},
                     "field `personas` differs: entry 1 is 'p0'"),
    "question ids": ({"questions": ["q0", "q1", "q2", "q3", "q4", "other"]},
                     "field `questions` differs: entry 6 is 'q5'"),
    "persona prompts": ({"persona_hash": "another"}, "field `persona_hash` differs (the same "
                        "persona names with other system prompts)"),
    "question texts": ({"question_hash": "another"}, "field `question_hash` differs (the same "
                       "question ids with other texts)"),
    "no question hash": ({"question_hash": None}, "field `question_hash` differs ("),
    "phrasing": ({"prompt_index": 1}, "field `prompt_index` differs"),
    "end of turn": ({"include_eot": True, "_a_eot": False}, "field `include_eot` differs"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_stores_of_other_personas_or_questions_are_refused_naming_the_field(tmp_path, case):
    prov, message = REFUSED[case]
    prov = dict(prov)
    a_eot = prov.pop("_a_eot", None)
    a, b = _stores(tmp_path, **prov)
    if a_eot is not None:  # both stores record include_eot, with other values
        import shutil
        shutil.rmtree(a)
        rng = np.random.default_rng(0)
        a = write_store(a, *model_vectors(rng, geometry(rng, 8), 16, 6, 1.0), include_eot=False)
    with pytest.raises(TlpersonaError, match=None) as err:
        compare_models(open_store(a), open_store(b))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_stores_without_hashes_are_checked_by_name_and_say_so():
    a, b = memory_pair(8, True, 0)
    for src in (a, b):
        src.provenance = {"model": src.provenance["model"]}
    res = compare_models(a, b, CrossModelConfig(n_null=5))
    assert any("Neither store records `persona_hash`" in n for n in res.notes)
    assert any("Neither store records `question_hash`" in n for n in res.notes)
    b.provenance = {**b.provenance, "question_hash": "qh"}
    with pytest.raises(TlpersonaError, match="field `question_hash` differs .*records none"):
        compare_models(a, b)


def test_the_persona_count_is_named_when_it_differs(tmp_path):
    rng = np.random.default_rng(0)
    a = write_store(tmp_path / "a", *model_vectors(rng, geometry(rng, 8), 16, 6, 1.0))
    b = write_store(tmp_path / "b", *model_vectors(rng, geometry(rng, 9), 16, 6, 1.0))
    with pytest.raises(TlpersonaError, match=r"field `personas` differs: .*a has 8, .*b has 9"):
        compare_models(open_store(a), open_store(b))


def test_no_common_recipe_or_layer_and_other_depths_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    geo = geometry(rng, 8)
    a = write_store(tmp_path / "a", *model_vectors(rng, geo, 16, 6, 1.0))
    b = write_store(tmp_path / "b", *model_vectors(rng, geo, 16, 6, 1.0),
                    positions=["prompt_mean", "raw_system_last"])
    # the same tensors under other names: no recipe in common
    import shutil
    shutil.rmtree(b)
    n, n_q = 8, 6
    per_q, inv = model_vectors(rng, geo, 16, n_q, 1.0)
    prov = {"model": "m", "model_identity": "hub:m", "dtype": "float32", "layers": LAYERS,
            "positions": ["prompt_mean"], "personas": [f"p{i}" for i in range(n)],
            "persona_hash": "ph", "questions": [f"q{j}" for j in range(n_q)],
            "question_hash": "qh", "prompt_index": 0, "include_eot": None,
            "responses_hash": None}
    w = StoreWriter(b, prov, {"d_model": 16, "n_layers_total": 4})
    for i in range(n):
        w.write_part(i, {"prompt_mean/centroid": torch.as_tensor(inv[i]).float()})
    w.finalize()
    with pytest.raises(TlpersonaError, match="no recipe in common .*last, sys_end.*prompt_mean"):
        compare_models(open_store(a), open_store(b))
    with pytest.raises(TlpersonaError, match="position prompt_mean is not in .*a"):
        compare_models(open_store(a), open_store(b), CrossModelConfig(positions=["prompt_mean"]))
    deeper = write_store(tmp_path / "c", *model_vectors(rng, geo, 16, n_q, 1.0), depth=6)
    with pytest.raises(TlpersonaError, match=r"different depths \(4 and 6 blocks\).*`layers_a` "
                                             r"and `layers_b`"):
        compare_models(open_store(a), open_store(deeper))
    with pytest.raises(TlpersonaError, match="`layers_a` needs `layers_b`"):
        compare_models(open_store(a), open_store(deeper), CrossModelConfig(layers_a=[1]))
    with pytest.raises(TlpersonaError, match=r"`layers_b` 5 is not stored in .*c \(it has"):
        compare_models(open_store(a), open_store(deeper),
                       CrossModelConfig(layers_a=[1], layers_b=[5]))
    with pytest.raises(TlpersonaError, match="at least 4 personas"):
        few = [write_store(tmp_path / f"f{i}", *model_vectors(rng, geometry(rng, 3), 16, n_q, 1.0))
               for i in range(2)]
        compare_models(open_store(few[0]), open_store(few[1]))


def test_explicit_layer_pairs_and_negative_layers(tmp_path):
    """Models of different depths: the pairs are given, negative layers count from each
    model's own end, and the cells say which layer of each they compare."""
    rng = np.random.default_rng(2)
    geo = geometry(rng, 10)
    a = write_store(tmp_path / "a", *model_vectors(rng, geo, 16, 8, 1.0), depth=4)
    b = write_store(tmp_path / "b", *model_vectors(rng, geo[:, ::-1], 24, 8, 1.0), depth=4)
    res = compare_models(open_store(a), open_store(b),
                         CrossModelConfig(layers_a=[1, 3], layers_b=[-1, 1], n_null=5))
    assert res.layer_pairs == [(1, 3), (3, 1)] and res.layer_pairing.startswith("given")
    assert {(c.layer_a, c.layer_b) for c in res.cells} == {(1, 3), (3, 1)}
    # B's layers are A's in reverse order: the pairs that match are the ones called agree
    assert all(c.call == "agree" for c in res.cells)
    assert res.cell(PER_QUESTION, 1, 3).mc_r > 0.9


# --- the API's front door, the saved set and the CLI -------------------------------------------

def test_the_front_door_saves_a_set_that_loads_back_equal(tmp_path):
    import json

    import tlpersona as tlp

    a, b = planted_pair(tmp_path, 10, related=True, d_b=32)
    out = tmp_path / "out"
    res = tlp.compare_models(a, b, out, positions=["a"], null_draws=10)
    assert isinstance(res, tlp.CrossModelResult) and res.recipes == [PER_QUESTION]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"report.md", "details.md", "cells.csv", "cross_model.json",
            "figures/cross_model.png"} <= set(files)
    report = (out / "report.md").read_text()
    assert report.splitlines()[2] == f"**{res.answer}**"  # the answer first
    assert "model org/base" in report and "model org/instruct" in report
    assert res.recipe_answers[0].sentence in report
    data = json.loads((out / "cross_model.json").read_text())
    assert data["code_version"] == tlp.__version__ and data == json.loads(json.dumps(res.to_dict()))
    assert data["a"]["manifest_hash"] == open_store(a).manifest_hash
    loaded = tlp.CrossModelResult.load(out)
    assert json.loads(json.dumps(loaded.to_dict())) == data
    import csv

    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert len(rows) == len(res.cells) == 3
    assert float(rows[0]["mc_r"]) == res.cells[0].mc_r and rows[0]["call"] == res.cells[0].call
    with pytest.raises(TlpersonaError, match="overwrite"):
        tlp.compare_models(a, b, out)
    before = (out / "report.md").read_bytes()
    with pytest.raises(TlpersonaError, match="`null_draws` must be at least 1"):
        tlp.compare_models(a, b, out, null_draws=0, overwrite=True)
    assert (out / "report.md").read_bytes() == before


def _cli(*args: str) -> tuple[int, list[str], str]:
    from tlpersona.cli import main

    res = CliRunner().invoke(main, ["compare", *args])
    return res.exit_code, [x for x in res.output.splitlines() if x.startswith("error:")], res.output


def test_the_cli_runs_compare_against_and_refuses_what_does_not_apply(tmp_path):
    a, b = planted_pair(tmp_path, 10, related=True)
    out = tmp_path / "out"
    code, errors, output = _cli(str(a), "--against", str(b), "--out", str(out),
                                "--null-draws", "10", "--positions", "last")
    assert code == 0, output
    assert output.splitlines()[0].startswith("Is each recipe's persona geometry the same")
    assert "- `last` — agree" in output and (out / "report.md").exists()
    bad = {
        ("--pass-mc-r", "0.5"): "--pass-mc-r does not apply with --against",
        ("--gate-spread",): "--gate-spread does not apply with --against",
        ("--layers", "1"): "--layers does not apply with --against: pair",
        ("--layers-a", "1"): "--layers-a needs --layers-b",
        ("--layers-a", "1,2", "--layers-b", "1"): "--layers-a has 2 layers and --layers-b 1",
        ("--layers-a", "x", "--layers-b", "1"): "bad --layers-a 'x'",
        ("--layers-a", "9", "--layers-b", "1"): "--layers-a 9 is not stored in",
        ("--positions", "first"): "position first is not in",
        ("--splits", "0"): "--splits must be at least 1",
    }
    for extra, message in bad.items():
        code, errors, output = _cli(str(a), "--against", str(b), "--out", str(tmp_path / "o"),
                                    *extra)
        assert code == 2 and len(errors) == 1 and message in errors[0], (extra, output)
        assert "Traceback" not in output and not (tmp_path / "o").exists()
    code, errors, _ = _cli("--from-seed", str(tmp_path), "--against", str(b), "--out",
                           str(tmp_path / "o"))
    assert code == 2 and "--from-seed does not apply with --against" in errors[0]
    code, errors, _ = _cli("--against", str(b), "--out", str(tmp_path / "o"))
    assert code == 2 and "give STORE" in errors[0]
    code, errors, _ = _cli(str(a), "--layers-a", "1", "--layers-b", "1", "--out",
                           str(tmp_path / "o"))
    assert code == 2 and "give them with --against" in errors[0]
    # other personas: refused naming the field, nothing written
    rng = np.random.default_rng(1)
    c = write_store(tmp_path / "c", *model_vectors(rng, geometry(rng, 10), 16, 12, 1.0),
                    personas=[f"x{i}" for i in range(10)])
    code, errors, _ = _cli(str(a), "--against", str(c), "--out", str(tmp_path / "o"))
    assert code == 2 and "the stores' field personas differs: entry 1 is 'p0'" in errors[0]
    assert not (tmp_path / "o").exists()
    # an earlier set is replaced only with --overwrite
    code, errors, _ = _cli(str(a), "--against", str(b), "--out", str(out))
    assert code == 2 and "--overwrite" in errors[0]
