"""Full comparison at the users' scale on a synthetic store; prints the time per stage.

275 personas × 240 questions × 4 layers × d_model 3584, all seven recipes (four of them with
per-question vectors), Mantel permutations sized to the family (``auto``, 3,400 for 84 cells).
Target: ≤ 2 minutes on a 2-core CPU, peak memory under 8 GiB.

    python benchmarks/compare_full_scale.py [--store DIR] [--permutations auto|N]
    python benchmarks/compare_full_scale.py --subspace [--null-draws 100] [--align procrustes]

``--subspace`` times the shared subspace (``tlpersona subspace``'s analysis) on the same store
instead of the comparison.

The synthetic store is written once (in a child process, so its memory does not count) and
reused if DIR already holds it.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tlpersona.cache import StoreWriter, open_store
from tlpersona.chat.positions import RECIPES

P, Q, LAYERS, D = 275, 240, [7, 14, 21, 27], 3584


def make_store(path: Path, seed: int = 0) -> None:
    """Recipes share a persona geometry (plus recipe-specific offset and noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(P, len(LAYERS), D, generator=g)
    positions = list(RECIPES.values())
    offsets = {p: 5 * torch.randn(len(LAYERS), D, generator=g) for p in positions}
    prov = {"personas": [f"role{i:03d}" for i in range(P)], "questions": [str(i) for i in range(Q)],
            "layers": LAYERS, "positions": positions, "prompt_index": 0, "synthetic": True}
    w = StoreWriter(path, prov, {"d_model": D})
    for i in range(P):
        t: dict[str, torch.Tensor] = {}
        for pos in positions:
            if pos in ("raw_system_last", "sys_end", "sys_end+1"):
                t[f"{pos}/centroid"] = base[i] + offsets[pos] + 0.5 * torch.randn(len(LAYERS), D, generator=g)
                continue
            pq = base[i] + offsets[pos] + torch.randn(Q, len(LAYERS), D, generator=g)
            t[f"{pos}/per_question"] = pq.half()
            t[f"{pos}/centroid"] = pq.mean(0)
            t[f"{pos}/valid"] = torch.ones(Q, dtype=torch.uint8)
        t["prompt_mean/n_tokens"] = torch.full((Q,), 60.0)
        t["prompt_mean_no_last/n_tokens"] = torch.full((Q,), 59.0)
        w.write_part(i, t)
    w.finalize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "tlpersona-bench-store"))
    ap.add_argument("--permutations", type=lambda v: None if v == "auto" else int(v), default=None,
                    help="auto (default: sized to the family) or a count")
    ap.add_argument("--make-only", action="store_true")
    ap.add_argument("--subspace", action="store_true", help="time the shared subspace instead")
    ap.add_argument("--null-draws", type=int, default=100)
    ap.add_argument("--align", default="none")
    args = ap.parse_args()
    path = Path(args.store)
    if args.make_only:
        make_store(path)
        return
    if not (path / "manifest.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make-only", "--store", str(path)], check=True)
        print(f"synthetic store written in {time.perf_counter() - t0:.1f} s (not counted)")

    from tlpersona.analyses.compare import CompareConfig, compare

    torch.set_num_threads(max(1, torch.get_num_threads()))
    st = open_store(path)
    if args.subspace:
        from tlpersona.analyses.subspace import SubspaceConfig, subspace

        t0 = time.perf_counter()
        sub = subspace(st, SubspaceConfig(null_draws=args.null_draws, align=args.align))
        print(f"subspace, {len(sub.positions)} recipes x {len(LAYERS)} layers, "
              f"{args.null_draws} relabelled draws, align {args.align}: "
              f"{time.perf_counter() - t0:.1f} s; k_found per layer "
              f"{[lay.k_found.k for lay in sub.layers]}")
        return
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    res = compare(st, CompareConfig(permutations=args.permutations), stages)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"{P} personas x {Q} questions x {len(LAYERS)} layers x d {D}, {len(res.positions)} "
          f"recipes, {len(res.cells)} cells, {res.n_permutations} permutations, "
          f"{torch.get_num_threads()} threads")
    for stage, sec in stages.items():
        print(f"  {stage:22s} {sec:7.1f} s")
    print(f"  {'total':22s} {total:7.1f} s   (target <= 120 s)")
    print(f"peak memory {peak:.2f} GiB (target < 8 GiB)")
    print(res.answer)


if __name__ == "__main__":
    main()
