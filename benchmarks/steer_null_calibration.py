"""Calibration of steering's "beyond random" test on the embedded model's own random directions.

Runs the default experiment's steering section (``add`` at the middle stored layer, its four
strengths, 3 target personas, 5 questions, 6 response tokens) with ``--directions`` random
directions instead of 10. At every selected setting the directions' effects form a pool; each
direction in turn plays "own" against ``--k`` others drawn from the rest, and the script
reports how often the shape-checked t-prediction (the default), the plain t-prediction and the
rank p call it at 0.05 and at the Holm threshold of the experiment's family (0.05 / 8). The
replicates share directions, so they are not independent: read the rates as estimates whose
error is larger than the binomial one printed. It also gives the recipes' exact rank p over all
the directions, the confirmation that needs no assumption.

    python benchmarks/steer_null_calibration.py STORE [--directions 100] [--k 10] [--draws 20000]
    python benchmarks/steer_null_calibration.py --planted [--k 10] [--draws 200000]

``STORE``: an experiment's store (``tlpersona experiment`` writes ``OUT/store``). ``--planted``
needs no model: pools drawn from named laws (normal, skew-normal both ways, t, lognormal,
gamma), the same rates vectorised, and how often each law's pool passes the shape check.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

import tlpersona as tlp
from tlpersona.analyses.stats import holm
from tlpersona.api.experiment import STEER_ALPHAS
from tlpersona.cache import open_store
from tlpersona.data import builtin_personas, builtin_questions
from tlpersona.interventions.steering.bootstrap import beyond_random, pool_skew, rank_p

LAWS = {
    "normal": stats.norm(),
    "skew-normal a=-1.78 (skew -0.39, the model's)": stats.skewnorm(-1.78),
    "skew-normal a=-4 (skew -0.78)": stats.skewnorm(-4),
    "skew-normal a=+4 (skew +0.78)": stats.skewnorm(4),
    "lognormal s=0.3 (skew +0.95)": stats.lognorm(0.3),
    "gamma 4 (skew +1)": stats.gamma(4),
    "t 5": stats.t(5),
    "t 3": stats.t(3),
}


def planted(k: int, draws: int, seed: int) -> None:
    """Rates of the checked and plain t-prediction on pools of ``k`` plus one more draw."""
    rng = np.random.default_rng(seed)
    alphas = (0.05, 0.05 / 8, 0.05 / 21)
    print(f"pools of {k}, {draws} replicates; rate / nominal at " + ", ".join(f"{a:.4g}" for a in alphas))
    for name, law in LAWS.items():
        x = law.rvs(size=(draws, k + 1), random_state=rng)
        pool, own = x[:, :k], x[:, k]
        m, sd = pool.mean(1), pool.std(1, ddof=1)
        p = stats.t.sf((own - m) / (sd * np.sqrt(1 + 1 / k)), k - 1)
        ok = stats.skew(pool, axis=1, bias=False) <= 0  # beyond_random's check
        plain = " ".join(f"{(p < a).mean() / a:.2f}" for a in alphas)
        checked = " ".join(f"{((p < a) & ok).mean() / a:.2f}" for a in alphas)
        print(f"  {name}: plain {plain}; checked {checked}; passes the check {ok.mean():.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", nargs="?")
    ap.add_argument("--planted", action="store_true")
    ap.add_argument("--directions", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.planted or args.store is None:
        planted(args.k, args.draws if args.draws != 20000 else 200000, args.seed)
        return
    st = open_store(args.store)
    mid = st.layers[(len(st.layers) - 1) // 2]
    t0 = time.perf_counter()
    res = tlp.steer(st, None, builtin_personas(), builtin_questions(), n_questions=5,
                    n_personas=3, layers=[mid], operators=["add"], alphas=STEER_ALPHAS,
                    response_tokens=6, seed=args.seed, n_boot=200, continuations=0,
                    n_random=args.directions, progress=False)
    print(f"steering with {args.directions} directions: {time.perf_counter() - t0:.0f} s")
    family = len(res.scores)
    pools = {s.setting.label(): np.array(s.random_effects) for s in res.scores}
    rng = np.random.default_rng(args.seed)
    alphas = (0.05, 0.05 / family)
    for label, pool in pools.items():
        n = pool.size
        calls = {name: np.zeros(len(alphas)) for name in ("checked t", "plain t", "rank")}
        for _ in range(args.draws):
            own = rng.integers(n)
            rest = np.delete(np.arange(n), own)
            sample = pool[rng.choice(rest, args.k, replace=False)]
            test = beyond_random(float(pool[own]), sample)
            for name, p in (("checked t", test.p), ("plain t", test.t_p), ("rank", test.rank_p)):
                calls[name] += [p < a for a in alphas]
        se = [np.sqrt(a * (1 - a) / args.draws) for a in alphas]
        print(f"{label}: {n} directions, mean {pool.mean():.3f}, sd {pool.std(ddof=1):.3f}, "
              f"skew {pool_skew(pool):+.2f}")
        for name, c in calls.items():
            rates = ", ".join(f"{r / args.draws:.4f} at {a:.4g} (binomial se {s:.4f})"
                              for r, a, s in zip(c, alphas, se, strict=True))
            print(f"  {name}: {rates}")
    exact = [rank_p(s.own.effect.mean, s.random_effects) for s in res.scores]
    for s, p, h in zip(res.scores, exact, holm(exact), strict=True):
        print(f"{s.recipe} ({s.setting.label()}): own {s.own.effect.mean:.3f}, rank p over "
              f"{args.directions} = {p:.4f}, Holm over {family} = {h:.4f}")


if __name__ == "__main__":
    main()
