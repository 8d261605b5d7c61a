"""Where a decode step's time goes: the static decoder's step on the Qwen2.5-7B architecture
(random bf16 weights) at one batch size, run eagerly under the PyTorch profiler (the same kernels
the CUDA graph replays), with the CUDA kernels ranked by their time per decode step; also the
graph-replay step time and the decoder's tokens/s.

    PYTHONPATH=. python benchmarks/gpu_decode_profile.py --batch 960 --prompt-len 80
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.gpu_extract import qwen7b
from tlpersona.runtime.decode import StaticGreedy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=960)
    ap.add_argument("--prompt-len", type=int, default=80)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--layers", default="7,14,21,27", help="captured layers ('' for none)")
    ap.add_argument("--profile-steps", type=int, default=32, help="0: no kernel profile")
    ap.add_argument("--no-fused", action="store_true", help="HF's modules instead of the fused kernels")
    args = ap.parse_args()
    fused = not args.no_fused
    model = qwen7b(0)
    layers = [int(x) for x in args.layers.split(",") if x]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (args.batch, args.prompt_len), generator=g).tolist()
    dec = StaticGreedy(model, args.new_tokens, [2], 2, layers=layers, fused=fused)
    dec.capture(prompts)  # graph capture
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec.capture(prompts)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"{torch.cuda.get_device_name()}: batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, captured layers {layers}, fused kernels {fused}: "
          f"{wall:.2f} s per batch = "
          f"{args.batch * args.new_tokens / wall:.0f} generated tok/s; "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    # the prefill alone: one new token, no capture (so no step runs)
    pre = StaticGreedy(model, 1, [2], 2, fused=fused)
    pre(prompts)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pre(prompts)
    torch.cuda.synchronize()
    t_pre = time.perf_counter() - t0
    del pre
    steps = args.new_tokens if layers else args.new_tokens - 1
    print(f"prefill {t_pre:.2f} s; graph replay {(wall - t_pre) / steps * 1e3:.2f} ms per decode step")
    if not args.profile_steps:
        return
    # Kernel time of the decode steps alone: two eager runs that differ only in their number of
    # steps, so the prefill (as costly as tens of steps) cancels in the difference.
    short, long = 8, 8 + args.profile_steps
    totals = []
    for n in (short, long):
        eager = StaticGreedy(model, n, [2], 2, use_graphs=False, layers=layers, fused=fused)
        eager.capture(prompts)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eager.capture(prompts)
            torch.cuda.synchronize()
        totals.append({e.key: e.self_device_time_total for e in prof.key_averages()})
        del eager
    per_step = {k: (totals[1].get(k, 0.0) - totals[0].get(k, 0.0)) / args.profile_steps
                for k in totals[1]}
    total = sum(per_step.values())
    print(f"kernel time per decode step (eager, {args.profile_steps} steps): {total / 1e3:.2f} ms")
    for k, us in sorted(per_step.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {us / 1e3:7.3f} ms {us / total:6.1%}  {k[:100]}")


if __name__ == "__main__":
    main()
