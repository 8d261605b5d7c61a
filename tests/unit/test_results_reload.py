"""Saved results load back as the results that were saved: ``.to_dict()`` (with its types:
tuples, integer keys), the headline attributes and the answer, and a file of another kind, a
directory without the file or a field this version does not know is one line."""

import json
import math

import numpy as np
import pytest
from factories import write_synthetic
from safetensors.numpy import load_file

import tlpersona as tlp
from tlpersona.analyses.projection import Combined, Nearest
from tlpersona.api.results import Projected
from tlpersona.data import Inputs
from tlpersona.errors import TlpersonaError
from tlpersona.interventions import patching as P
from tlpersona.interventions import steering as S
from tlpersona.interventions.selection import PersonaChoice
from tlpersona.interventions.steering.bootstrap import Estimate
from tlpersona.interventions.steering.config import Setting
from tlpersona.interventions.steering.result import (
    Arm,
    Continuation,
    CurvePoint,
    Example,
    RecipeScore,
)
from tlpersona.version import __version__


def same(a, b, at="") -> None:
    """Deep equality that also holds the containers' types (a tuple is not a list, an integer
    key not its digits) and takes NaN as equal to NaN."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), at
        assert (math.isnan(a) and math.isnan(b)) or a == b, (at, a, b)
        return
    assert type(a) is type(b), (at, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), at
        for k in a:
            same(a[k], b[k], f"{at}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), at
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{at}[{i}]")
    else:
        assert a == b, (at, a, b)


def test_same_tells_tuples_and_integer_keys_from_their_json():
    """The comparison the tests rest on fails where a reload would lose a type."""
    for a, b in [({1: 2.0}, {"1": 2.0}), ([(1, 2)], [[1, 2]]), ({"x": 1.0}, {"x": 1.5})]:
        with pytest.raises(AssertionError):
            same(a, b)
    same({"x": [math.nan, (1, 2.0)]}, {"x": [math.nan, (1, 2)]})


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("reload") / "s")


@pytest.fixture(scope="module")
def saved_compare(synth, tmp_path_factory):
    result = tlp.compare(synth, permutations=99, splits=4, null_draws=20)
    out = tmp_path_factory.mktemp("cmp") / "c"
    result.save(out)
    return result, out


def test_compare_round_trip(synth, saved_compare):
    result, out = saved_compare
    for path in (out, out / "results.json"):
        back = tlp.CompareResult.load(path)
        same(back.to_dict(), result.to_dict())
        assert back.to_dict()["code_version"] == __version__
        assert back.cells == result.cells and back.answer == result.answer
        assert (back.layers, back.positions, back.personas, back.partition, back.notes) == \
            (result.layers, result.positions, result.personas, result.partition, result.notes)
        assert back.recipe_robust == result.recipe_robust
        assert back.min_attainable_p_holm == result.min_attainable_p_holm
        assert repr(back) == repr(result)
        assert back.cell(5, "last", "prompt_mean") == result.cell(5, "last", "prompt_mean")
    # without its store, what reads the store says so; with it, it works as the original
    with pytest.raises(TlpersonaError, match="loaded without it: load it again with `source`"):
        back.cell(-1, "last", "sys_end")
    with pytest.raises(TlpersonaError, match="save"):
        back.save(out.parent / "again")
    assert not (out.parent / "again").exists()
    attached = tlp.CompareResult.load(out, source=synth.root)
    assert attached.cell(-1, "last", "sys_end") == result.cell(-1, "last", "sys_end")
    again = attached.save(out.parent / "again")
    assert json.loads((again.parent / "results.json").read_text()) == \
        json.loads((out / "results.json").read_text())


def test_compare_refuses_another_store(saved_compare, tmp_path):
    _, out = saved_compare
    other = write_synthetic(tmp_path / "other", n_p=10)  # other personas: another provenance
    with pytest.raises(TlpersonaError, match="`source` .* is not the store"):
        tlp.CompareResult.load(out, source=other)


@pytest.fixture(scope="module")
def saved_subspace(synth, tmp_path_factory):
    result = tlp.subspace(synth, null_draws=9)
    out = tmp_path_factory.mktemp("sub") / "s"
    result.save(out)
    return result, out


def test_subspace_round_trip(synth, saved_subspace):
    result, out = saved_subspace
    back = tlp.SubspaceResult.load(out)
    same(back.to_dict(), result.to_dict())
    assert back.layers == result.layers and back.answer == result.answer
    assert (back.positions, back.unit_norm) == (result.positions, result.unit_norm)
    assert list(back.components) == list(result.components) == [2, 5]
    stored = load_file(str(out / "pcs.safetensors"))
    for la, comp in result.components.items():
        assert back.components[la].shape == comp.shape
        # exactly the file, which holds the computed PCs at float32 precision
        np.testing.assert_array_equal(back.components[la], stored[f"layer_{la}"])
        np.testing.assert_allclose(back.components[la], comp, rtol=0, atol=1e-6)
    with pytest.raises(TlpersonaError, match="load it again with `source`"):
        back.save(out.parent / "again")
    tlp.SubspaceResult.load(out / "subspace.json", source=synth).save(out.parent / "again")
    np.testing.assert_array_equal(load_file(str(out.parent / "again" / "pcs.safetensors"))["layer_5"],
                                  stored["layer_5"])


def test_subspace_refuses_pcs_of_other_layers(saved_subspace, tmp_path):
    from safetensors.numpy import save_file

    _, out = saved_subspace
    (tmp_path / "subspace.json").write_bytes((out / "subspace.json").read_bytes())
    save_file({"layer_7": np.zeros((2, 10), np.float32)}, str(tmp_path / "pcs.safetensors"))
    with pytest.raises(TlpersonaError, match="holds layer_7, not the layers"):
        tlp.SubspaceResult.load(tmp_path)
    (tmp_path / "pcs.safetensors").unlink()
    # without the PCs the numbers load; saving (which needs them) says what is missing
    back = tlp.SubspaceResult.load(tmp_path)
    assert back.components == {} and back.answer == saved_subspace[0].answer


def test_projection_round_trip_of_stored_personas(synth, tmp_path):
    result = tlp.project(synth, layer=5, axis="persona:p3")
    path = result.save(tmp_path / "pr")
    back = tlp.ProjectionResult.load(path.parent)
    same(back.to_dict(), result.to_dict())
    assert back == result  # every field, the points in their order


def test_projection_round_trip_of_new_items(tmp_path):
    """New items' nearest-persona and combined tests (a projection of new material needs a
    model, so the result is made here as :func:`tlpersona.project` makes it)."""
    stored = [Projected(p, r, {"PC1": c, "PC2": -c}, True)
              for r in ("last", "sys_end") for p, c in (("a", 0.5), ("b", -1.25), ("c", 2.0))]
    near = Nearest([("b", 0.75), ("a", -0.125)], 2, 4, 0.5, 2, False)
    new = [Projected("system:0", r, {"PC1": 0.25, "PC2": 3.0}, False, near, "You are x.", ["Q?"])
           for r in ("last", "sys_end")]
    result = tlp.ProjectionResult(
        "runs/store", 5, "pcs", ["last", "sys_end"], ["PC1", "PC2"], stored + new,
        Inputs("model-hash", "ph", "qh", "mh"), [Combined("system:0", ["last", "sys_end"], 1, 4,
                                                          0.25, 1, True)])
    path = result.save(tmp_path / "pr")
    back = tlp.ProjectionResult.load(path)
    same(back.to_dict(), result.to_dict())
    assert back == result
    assert back.points[-1].nearest.top == [("b", 0.75), ("a", -0.125)]
    assert back.combined[0].p == 0.25


def test_projection_keeps_the_version_that_computed_it(tmp_path):
    result = tlp.ProjectionResult("s", 1, "pcs", ["last"], ["PC1"],
                                  [Projected("a", "last", {"PC1": 1.0}, True)],
                                  Inputs(None, None, None))
    data = result.to_dict() | {"code_version": "0.1.9"}
    (tmp_path / "projection.json").write_text(json.dumps(data))
    assert tlp.ProjectionResult.load(tmp_path).to_dict() == data


def _patch_result() -> tlp.PatchResult:
    rng = np.random.default_rng(3)
    rows = ["sys_start+1", "sys_end", "last"]

    def grid(shift):
        return [P.CellEffect("exact", "resid_post", r, la, None, 0.0, math.nan, 4, False,
                             [float(x) for x in rng.uniform(0, 1, 4) + shift])
                for r in rows for la in (3, 5)]

    cells, control = grid(0.3), grid(0.0)
    cells = [P.CellEffect(c.method, c.component, c.position, c.layer, c.head,
                          float(np.mean(c.kl_by_question)), 0.5, c.n, c.noop, c.kl_by_question)
             for c in cells]
    cells.append(P.CellEffect("attribution", "attn_out", "last", 5, 2, 0.125, -0.25, 4, False))
    test = P.beyond_rewording(cells, control, 0.05, lambda c: False, 2, 1)
    assert test is not None
    agree = P.Agreement("resid_post", "kl", 0.8, 6, {"system": (0.5, 2), "after": (0.9, 4)},
                        {3: 0.7, 5: 0.9}, [("last", 5, None, 0.9, 0.4), ("sys_end", 3, 1, 0.2, 0.6)])
    return tlp.PatchResult(
        P.PatchConfig(layers=[3, 5], positions=["system", "sys_end", "last"], max_rows=8),
        "default", [("pirate", "assistant"), ("poet", "assistant")], "named by hand", ["q1", "q2"],
        rows, [3, 5], 9, 30, 1.5, cells, control, "clean = 'assistant' in its phrasing 1",
        [agree], {"exact": 1.25, "attribution": 0.5}, Inputs("id", "ph", "qh", None), test)


def test_patch_round_trip(tmp_path):
    result = _patch_result()
    result.save(tmp_path / "p")
    back = tlp.PatchResult.load(tmp_path / "p")
    same(back.to_dict(), result.to_dict())  # tuples, integer layer keys, NaN effects
    assert isinstance(back, tlp.PatchResult)
    assert back.answer() == result.answer() and repr(back) == repr(result)
    assert back.agreement[0].by_layer == {3: 0.7, 5: 0.9}
    assert back.pairs == [("pirate", "assistant"), ("poet", "assistant")]
    assert back.rewording_test == result.rewording_test and back.config == result.config


def _steering_result() -> tlp.SteeringResult:
    def est(m):
        return Estimate(m, m - 0.1, m + 0.1, 4)

    def arm(m):
        return Arm(est(m), est(m / 2), 0.25, 8)

    scores = [RecipeScore(
        op, recipe, Setting(op, (la,) if op == "add" else (3, 5), 1 if op == "ablate" else 0.5),
        0.4, True if op == "add" else None, True, arm(0.5 + i / 10), arm(0.05),
        [0.01, 0.07, -0.02], arm(0.2) if op == "add" else None, est(0.3) if op == "add" else None,
        est(-0.1), 0.25, random_p_holm=0.5, random_test="t", random_test_p=0.2, random_t_p=0.2,
        random_skew=0.5, rank=i + 1, monotone_p=math.nan,
        examples=[Example("pirate", "q3", 1.0, 0.5, 0.25, -0.05)],
        curve=[CurvePoint(0.5, 0.3, 0.1), CurvePoint(1.0, 0.4, 0.2)], monotone_rho=1.0)
        for i, (op, recipe, la) in enumerate([("add", "last", 5), ("add", "sys_end", 3),
                                              ("ablate", "last", 5)])]
    cfg = S.SteerConfig(recipes=["last", "sys_end"], layers=[3, 5], operators=["add", "ablate"],
                        n_personas=2, n_random=3, progress=False)
    return tlp.SteeringResult(
        cfg, "mh", "default", "assistant",
        PersonaChoice(["pirate", "poet"], "farthest", {"pirate": -1.5, "poet": -1.0}),
        ["q1"], ["q2", "q3"], "1 selection, 2 scoring", [3, 5], ["last", "sys_end"],
        {3: 12.5, 5: 20.25}, scores, {"add": "add: none", "ablate": "ablate: none"}, 3.5,
        [Continuation("pirate", "q2", "last", "L5 alpha 0.5", "hi", "arr", "hm", "ahoy",
                      {"base": -1.0, "steered": -2.5, "random": -1.5, "persona_itself": -0.75})],
        Inputs("id", "ph", "qh", "mh"))


def test_steering_round_trip(tmp_path):
    result = _steering_result()
    result.save(tmp_path / "st")
    back = tlp.SteeringResult.load(tmp_path / "st" / "steering.json")
    # layers tuples, integer norm keys; a NaN where None may stand is saved as null, so it
    # reads back as None (the file cannot tell them apart)
    assert [s.monotone_p for s in back.scores] == [None] * 3
    for s in result.scores:
        s.monotone_p = None
    same(back.to_dict(), result.to_dict())
    assert back.answer() == result.answer() and repr(back) == repr(result)
    assert back.typical_norm == {3: 12.5, 5: 20.25}
    assert back.scores[2].setting.layers == (3, 5) and back.scores[2].interior is None
    assert back.scores[0].other == result.scores[0].other and back.config == result.config
    # a file of an earlier version keeps its version through the round trip
    data = json.loads((tmp_path / "st" / "steering.json").read_text()) | {"code_version": "0.1.0"}
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert tlp.SteeringResult.load(tmp_path / "old.json").to_dict()["code_version"] == "0.1.0"


def test_a_file_of_another_kind_or_a_directory_without_it_is_one_line(saved_compare, tmp_path):
    _, cmp_dir = saved_compare
    _steering_result().save(tmp_path / "st")
    cases = [
        (tlp.CompareResult.load, tmp_path / "st" / "steering.json",
         "is a steering result, not a compare result for CompareResult.load (load it with "
         "SteeringResult.load)"),
        (tlp.SteeringResult.load, cmp_dir / "results.json", "is a compare result, not a steering"),
        (tlp.PatchResult.load, tmp_path / "st", "no patch.json in this directory"),
        (tlp.SubspaceResult.load, cmp_dir, "no subspace.json in this directory"),
        (tlp.ProjectionResult.load, tmp_path / "nothing.json", "file not found"),
        (tlp.CompareResult.load, tmp_path / "st" / "figures", "no results.json"),
    ]
    (tmp_path / "bad.json").write_text('{"cells": [1,')
    (tmp_path / "list.json").write_text("[1, 2]")
    cases += [(tlp.CompareResult.load, tmp_path / "bad.json", "invalid JSON"),
              (tlp.CompareResult.load, tmp_path / "list.json", "is not a tlpersona result")]
    for load, path, message in cases:
        with pytest.raises(TlpersonaError) as err:
            load(path)
        assert message in str(err.value) and "\n" not in str(err.value), (path, err.value)


def test_a_field_this_version_does_not_know_is_refused_naming_the_writer(tmp_path):
    _patch_result().save(tmp_path / "p")
    data = json.loads((tmp_path / "p" / "patch.json").read_text())
    data["code_version"] = "9.0.0"
    data["patching"]["cells"][2]["kl_ci"] = [0.1, 0.2]
    (tmp_path / "new.json").write_text(json.dumps(data))
    with pytest.raises(TlpersonaError, match=r"field 'patching.cells\[2\].kl_ci' is unknown to "
                       rf"tlpersona {__version__} \(the file was written by tlpersona 9.0.0"):
        tlp.PatchResult.load(tmp_path / "new.json")
    data["patching"]["cells"][2].pop("kl_ci")
    data["patching"]["cells"][2]["layer"] = "five"
    (tmp_path / "new.json").write_text(json.dumps(data))
    with pytest.raises(TlpersonaError, match=r"'patching.cells\[2\].layer' is 'five', not int"):
        tlp.PatchResult.load(tmp_path / "new.json")
    data["patching"]["cells"][2]["layer"] = 5
    del data["patching"]["model"]
    (tmp_path / "new.json").write_text(json.dumps(data))
    with pytest.raises(TlpersonaError, match="'patching.model' is missing"):
        tlp.PatchResult.load(tmp_path / "new.json")
    data["patching"]["model"] = "default"
    data["extra"] = 1
    (tmp_path / "new.json").write_text(json.dumps(data))
    with pytest.raises(TlpersonaError, match="field 'extra' is unknown"):
        tlp.PatchResult.load(tmp_path / "new.json")


def test_results_as_frames(saved_compare, saved_subspace, synth, monkeypatch):
    """`to_frame()`: compare's frame is cells.csv as pandas reads it; the others hold one row
    per cell, score, layer or point with the result's own values, nested objects as dotted
    columns, lists of numbers as tuples; without pandas, one line."""
    import sys

    import pandas as pd

    result, out = saved_compare
    got = result.to_frame()
    # cells.csv writes an absent value (None, or no mark) as an empty field, read as NaN
    absent = got.replace("", None).isna()
    pd.testing.assert_frame_equal(got.mask(absent, np.nan).infer_objects(),
                                  pd.read_csv(out / "cells.csv"), check_dtype=False)
    assert tlp.CompareResult.load(out).to_frame().equals(got)

    patch = _patch_result()
    frame = patch.to_frame()
    assert len(frame) == len(patch.cells)
    np.testing.assert_array_equal(frame["kl_effect"], [c.kl_effect for c in patch.cells])
    assert [x if x is None else list(x) for x in frame["kl_by_question"]] == [
        c.kl_by_question for c in patch.cells]  # an attribution cell has none
    steering = _steering_result()
    frame = steering.to_frame()
    assert list(frame["recipe"]) == [s.recipe for s in steering.scores]
    assert list(frame["setting.layers"]) == [s.setting.layers for s in steering.scores]
    assert list(frame["own.effect.lo"]) == [s.own.effect.lo for s in steering.scores]
    assert "examples" not in frame and "curve" not in frame  # lists of objects
    sub, _ = saved_subspace
    frame = sub.to_frame()
    assert list(frame["layer"]) == [la.layer for la in sub.layers]
    assert list(frame["k_found"]) == [la.k_found.k for la in sub.layers]
    proj = tlp.project(synth, layer=5, axis="persona:p3")
    frame = proj.to_frame()
    assert list(frame["coords.p3 axis"]) == [p.coords["p3 axis"] for p in proj.points]

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(TlpersonaError, match="to_frame needs pandas"):
        result.to_frame()
