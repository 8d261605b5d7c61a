"""Power and calibration of the shared subspace's k_found, on planted recipes (no model, CPU).

Per run, ``--layers`` independent layers of three recipes, scored as :func:`subspace` scores
them (one persona split per run, the same relabellings at every layer, the per-PC test at ALPHA
split over the layers, Holm over every layer). Prints, per persona count:

* calibration (unrelated recipes): the share of layers with k_found ≥ 1, and of runs with any
  layer at k_found ≥ 1 or called beyond the null after Holm (both should be ≤ 5 % + MC error);
* power (a planted 5-dimensional recipe-invariant subspace, std 2 → 1, beside 3 own dimensions of
  std 1 per recipe, noise 0.3 per coordinate, d 64): k_found per layer under the per-PC test and
  under the fixed r > 0.90 rule it replaces.

    .venv/bin/python benchmarks/subspace_power.py --runs 100 --personas 5,8,26,40
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from tlpersona.analyses.subspace import (
    count_against_null,
    draws_needed,
    held_out,
    holm_over_layers,
    k_found,
    pc_level,
)

POS = ["last", "sys_end", "sys_end+1"]
PAIRS = list(itertools.combinations(POS, 2))


def recipes(n: int, rng: np.random.Generator, related: bool, k: int = 5, d: int = 64,
            own: int = 3) -> dict[str, np.ndarray]:
    """Three recipes ``[n, d]``: a k-dim persona geometry (std 2 → 1; independent per recipe
    unless ``related``), 3 own dims (std 1), noise 0.3, an offset and a scale per recipe."""
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    std = np.linspace(2, 1, k)
    shared = rng.normal(size=(n, k)) * std
    out = {}
    for i, p in enumerate(POS):
        s = shared if related else rng.normal(size=(n, k)) * std
        cols = slice(k + i * own, k + (i + 1) * own)
        x = s @ basis[:, :k].T + rng.normal(size=(n, own)) @ basis[:, cols].T
        out[p] = (1 + 3 * i) * (x + 0.3 * rng.normal(size=(n, d)) + 4.0 * rng.normal(size=d))
    return out


def run(n: int, layers: int, draws: int, related: bool, seed: int) -> list[dict]:
    """One run: per layer, k_found (per-PC test), the fixed-rule count and the null p."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    fit, test = perm[: n // 2], perm[n // 2:]
    n_draws = max(draws, draws_needed(layers))
    relabels = [rng.permutation(n) for _ in range(n_draws)]
    out = []
    for _ in range(layers):
        raw = recipes(n, rng, related)
        held, _ = held_out(raw, POS, PAIRS, fit, test, 50, True, curve=False)
        null = [held_out({**raw, POS[-1]: raw[POS[-1]][r]}, POS, PAIRS, fit, test, 50, True,
                         curve=False)[0] for r in relabels]
        c = count_against_null(held, null, pc_level(layers), 0.90)
        out.append({"k_found": c.k, "k_found_null": c.null, "k_found_null_p": c.null_p,
                    "fixed": k_found(held, 0.90)})
    holm_over_layers(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--personas", default="5,8,26,40")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--power-runs", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--draws", type=int, default=100)
    a = ap.parse_args()
    for n in [int(v) for v in a.personas.split(",")]:
        t = time.time()
        runs = [run(n, a.layers, a.draws, False, s) for s in range(a.runs)]
        lay = np.mean([[bool(x["k_found"]) for x in r] for r in runs])
        any_k = np.mean([any(x["k_found"] for x in r) for r in runs])
        called = np.mean([any((x["k_found_null_p_holm"] or 1) < 0.05 for x in r) for r in runs])
        fixed = np.mean([any(x["fixed"] for x in r) for r in runs])
        se = np.sqrt(0.05 * 0.95 / a.runs)
        print(f"unrelated, {n} personas, {a.runs} runs × {a.layers} layers: layers k≥1 "
              f"{lay:.3f}; runs any k≥1 {any_k:.3f}, any called {called:.3f} (MC se at 5 %: "
              f"{se:.3f}); fixed r>0.9 rule any k≥1 {fixed:.3f}  [{time.time() - t:.0f} s]")
        if n >= 26:
            t = time.time()
            runs = [run(n, a.layers, a.draws, True, 1000 + s) for s in range(a.power_runs)]
            new = [x["k_found"] or 0 for r in runs for x in r]
            old = [x["fixed"] or 0 for r in runs for x in r]
            print(f"planted 5, {n} personas, {a.power_runs} runs × {a.layers} layers: per-PC "
                  f"test k {np.bincount(new, minlength=8).tolist()} (mean {np.mean(new):.2f}, "
                  f"|k−5| ≤ 1 in {np.mean(np.abs(np.array(new) - 5) <= 1):.2f}); fixed r>0.9 k "
                  f"{np.bincount(old, minlength=8).tolist()} (mean {np.mean(old):.2f})  "
                  f"[{time.time() - t:.0f} s]")


if __name__ == "__main__":
    main()
