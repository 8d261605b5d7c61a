"""Power and calibration of the shared subspace's k_found, on planted recipes (no model, CPU).

Per run, ``--layers`` independent layers of three recipes, scored as :func:`subspace` scores
them (one persona split per run, the same label permutations at every layer, the per-PC
intersection–union test at ALPHA split over the layers, Holm over every layer). Beside it, the
test it replaces: each PC's smallest r over the pairs against ``--draws`` relabelled-and-refitted
draws' same statistic. Prints, per persona count:

* calibration, two nulls: unrelated recipes, and partial sharing (the first and last recipe
  share a 3-dimensional geometry, the middle one is unrelated; the last is the one the old test
  relabels): the share of layers called (nominal ALPHA / layers) and of runs with any layer
  called after Holm (nominal ALPHA), for both tests;
* power (a planted 5-dimensional recipe-invariant subspace, std 2 → 1, beside 3 own dimensions of
  std 1 per recipe, noise 0.3 per coordinate, d 64): k_found per layer under both tests and the
  fixed r > 0.90 rule.

    .venv/bin/python benchmarks/subspace_power.py --runs 100 --personas 5,8,26,40
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from tests.factories import PLANTED_PAIRS, PLANTED_POSITIONS, planted_recipes, relabel_count
from tlpersona.analyses.kfound import (
    ALPHA,
    count_shared,
    k_found,
    label_permutations,
    pc_level,
    perm_count,
)
from tlpersona.analyses.stats import holm
from tlpersona.analyses.subspace import held_out

POS, PAIRS = PLANTED_POSITIONS, PLANTED_PAIRS
CASES = {"unrelated": (), "partial": ("last", "sys_end+1"), "planted": tuple(POS)}


def run(n: int, layers: int, draws: int, case: str, seed: int) -> list[dict[str, Any]]:
    """One run: per layer, k_found under the per-PC test, the replaced test and the fixed rule,
    and the Holm-adjusted call of both tests."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    fit, test = perm[: n // 2], perm[n // 2:]
    level = pc_level(layers)
    relabels = [rng.permutation(n) for _ in range(draws)]
    perms = label_permutations(len(test), perm_count(layers, None), rng)
    out = []
    for _ in range(layers):
        raw = planted_recipes(n, rng, CASES[case], 5 if case == "planted" else 3, d=64)
        held, _, scores = held_out(raw, POS, PAIRS, fit, test, 50, True, curve=False)
        c = count_shared(scores, PAIRS, perms, level, full=False)
        out.append({"iut": c.k or 0, "iut_p": c.p if c.k else 1.0,
                    "old": relabel_count(raw, fit, test, relabels, level) if draws else 0,
                    "fixed": k_found(held, 0.90) or 0})
    for lay, adj in zip(out, holm([lay["iut_p"] for lay in out]), strict=True):
        lay["iut_called"] = bool(lay["iut"]) and adj < ALPHA
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--personas", default="5,8,26,40")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--power-runs", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--draws", type=int, default=100, help="relabelled draws of the old test")
    a = ap.parse_args()
    se = np.sqrt(ALPHA * (1 - ALPHA) / a.runs)
    for n in [int(v) for v in a.personas.split(",")]:
        for case in ("unrelated", "partial"):
            t = time.time()
            runs = [run(n, a.layers, a.draws, case, s) for s in range(a.runs)]
            new_l = np.mean([[x["iut_called"] for x in r] for r in runs])
            old_l = np.mean([[bool(x["old"]) for x in r] for r in runs])
            new_r = np.mean([any(x["iut_called"] for x in r) for r in runs])
            old_r = np.mean([any(x["old"] for x in r) for r in runs])
            print(f"{case}, {n} personas, {a.runs} runs × {a.layers} layers: layers called "
                  f"IUT {new_l:.4f} / old {old_l:.4f} (nominal {pc_level(a.layers):.4f}); runs "
                  f"with a layer called IUT {new_r:.3f} / old {old_r:.3f} (nominal {ALPHA}, MC "
                  f"se {se:.3f})  [{time.time() - t:.0f} s]")
        if n >= 26:
            t = time.time()
            runs = [run(n, a.layers, a.draws, "planted", 1000 + s) for s in range(a.power_runs)]
            for key in ("iut", "old", "fixed"):
                ks = np.array([x[key] for r in runs for x in r])
                print(f"planted 5, {n} personas, {a.power_runs} runs × {a.layers} layers, {key}: "
                      f"k {np.bincount(ks, minlength=8).tolist()} (mean {ks.mean():.2f}, "
                      f"|k−5| ≤ 1 in {np.mean(np.abs(ks - 5) <= 1):.2f})")
            print(f"  [{time.time() - t:.0f} s]")


if __name__ == "__main__":
    main()
