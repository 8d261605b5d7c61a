"""Steered against unsteered greedy decoding with the static-cache CUDA-graph decoder, on the
Qwen2.5-7B architecture (random bf16 weights), same batch, prompts and new tokens, same card.

Every row carries its own random vector (``--batch`` distinct vectors); configurations: no
steering, ``add`` at one middle layer, ``add`` at several layers, and a capping clamp at one
layer. Rounds alternate the configurations so that clock and thermal drift hit all of them; the
median over rounds is reported, with each steered configuration's ratio to the unsteered one.
Random weights practically never emit the end-of-turn token, so every row decodes all
``--new-tokens``. Also checks that graph replay gives the eager decoder's steered ids and that
the vectors change the text.

    PYTHONPATH=. python benchmarks/gpu_steer_decode.py --batch 256 --new-tokens 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.gpu_extract import qwen7b
from tlpersona.runtime.decode import StaticGreedy
from tlpersona.runtime.edits import RowEdits


def edits(rows: int, d: int, layers: list[int], seed: int, cap: bool = False) -> dict[int, RowEdits]:
    """One random vector per row and layer, of a residual-sized norm (randn: ~sqrt(d)); with
    ``cap``, a unit direction per row with its projection floored at 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for la in layers:
        ed = RowEdits.neutral(rows, d)
        v = torch.randn(rows, d, generator=g)
        if cap:
            ed.u[:] = v / v.norm(dim=-1, keepdim=True)
            ed.lo[:] = 1.0
        else:
            ed.delta[:] = v
        out[la] = ed
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layer", type=int, default=14, help="the middle layer")
    ap.add_argument("--layers", default="7,14,21,27", help="the several-layer configuration")
    args = ap.parse_args()
    model = qwen7b(0)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(60, 101, (args.batch,), generator=g).tolist()  # left padding exercised
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in lens]
    many = [int(x) for x in args.layers.split(",")]
    configs = {
        "unsteered": None,
        f"add@{args.layer}": edits(args.batch, d, [args.layer], 2),
        f"add@{args.layers}": edits(args.batch, d, many, 3),
        f"cap@{args.layer}": edits(args.batch, d, [args.layer], 4, cap=True),
    }
    dec = StaticGreedy(model, args.new_tokens, [2], 2)
    out = {name: dec(prompts, st) for name, st in configs.items()}  # captures each form's graph
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, st in configs.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ids = dec(prompts, st)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            assert ids == out[name], f"{name}: graph replay is not deterministic"
    tokens = sum(len(r) for r in out["unsteered"])
    base = statistics.median(times["unsteered"])
    print(f"{torch.cuda.get_device_name()}: Qwen2.5-7B arch, random bf16; batch {args.batch}, "
          f"prompts 60-100 tokens, {args.new_tokens} new tokens, {args.rounds} rounds; "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    for name, ts in times.items():
        med = statistics.median(ts)
        changed = sum(a != b for a, b in zip(out[name], out["unsteered"], strict=True))
        print(f"  {name:>22}: {tokens / med:8.0f} generated tok/s (median {med:.2f} s; rounds "
              f"{', '.join(f'{t:.2f}' for t in ts)}) = {base / med:.1%} of unsteered; rows whose "
              f"text the edits changed {changed}/{args.batch}")
    # the graph replays the eager step's kernels, steering included
    k = min(args.batch, 64)
    name = f"add@{args.layers}"
    sub = {la: RowEdits(e.delta[:k], e.u[:k], e.lo[:k], e.hi[:k], e.start[:k])
           for la, e in configs[name].items()}
    eager = StaticGreedy(model, 48, [2], 2, use_graphs=False)(prompts[:k], sub)
    graph = StaticGreedy(model, 48, [2], 2)(prompts[:k], sub)
    print(f"  graph vs eager steered decoding ({name}, 48 tokens): "
          f"{sum(a == b for a, b in zip(graph, eager, strict=True))}/{k} identical rows")


if __name__ == "__main__":
    main()
