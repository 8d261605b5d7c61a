"""Time of the experiment's patching call and what its rewording-control test finds.

    .venv/bin/python benchmarks/patch_rewording_test.py --n-questions 6 --layers 3,15 \
        --positions system,sys_end,last --method exact [--out DIR]

Runs :func:`tlpersona.patch` on the embedded default model on the CPU (3 clean personas named
by hand, as a store would pick contrasting ones; against ``assistant``) and prints the wall time,
the test's families and p, and ``answer()``; with ``--out``, the per-question differences as
JSON (the planted data of ``tests/model/test_patching.py`` is sized from them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-questions", type=int, default=2)
    ap.add_argument("--layers", default=None, help="comma-separated; default: 8 spread")
    ap.add_argument("--positions", default="system,sys_end,sys_end+1,user_end,last")
    ap.add_argument("--method", default="both")
    ap.add_argument("--clean", default="pirate,villain,robot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch

    import tlpersona as tlp
    from tlpersona.data import builtin_personas, builtin_questions
    from tlpersona.models.loading import load_model

    torch.set_num_threads(a.threads)
    loaded = load_model("default", "cpu", "fp32")
    t0 = time.perf_counter()
    res = tlp.patch(loaded, builtin_personas(), builtin_questions(), n_questions=a.n_questions,
                    clean_personas=a.clean.split(","), corrupt="assistant",
                    layers=[int(x) for x in a.layers.split(",")] if a.layers else None,
                    positions=a.positions.split(","), method=a.method, progress=False)
    wall = time.perf_counter() - t0
    print(f"patch: {wall:.1f} s wall ({', '.join(f'{k} {v:.1f} s' for k, v in res.seconds.items())})")
    t = res.rewording_test
    if t is not None:
        print(f"cells {t.n_cells}, n {t.n}, min p {t.min_p:.3g}, min Holm cells "
              f"{t.min_holm_cells:.3g}, regions {t.min_holm_regions:.3g}")
        for r in t.regions:
            print(f"  {r.position}: persona {r.persona:.3f} control {r.control:.3f} "
                  f"diff {r.difference:+.3f} p {r.p:.3g} holm {r.p_holm:.3g}")
        called = [c for c in t.cells if c.carries]
        print(f"  cells called: {len(called)}; smallest p {min(c.p for c in t.cells):.3g}")
    print("answer:", res.answer(), f"({len(res.answer())} chars)")
    if a.out:
        ctl = {(c.position, c.layer): c for c in res.control}
        rows = [{"position": c.position, "layer": c.layer, "persona": c.kl_by_question,
                 "control": ctl[c.position, c.layer].kl_by_question}
                for c in res.select("exact", res.config.hook) if (c.position, c.layer) in ctl]
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "by_question.json").write_text(json.dumps(
            {"seconds": wall, "rows": rows}, default=lambda v: None if np.isnan(v) else v))


if __name__ == "__main__":
    main()
