"""Where a decode step's time goes: the static decoder's step on the Qwen2.5-7B architecture
(random bf16 weights) at one batch size, run eagerly under the PyTorch profiler (the same kernels
the CUDA graph replays), with the CUDA kernels ranked by total time; also the graph-replay step
time and the decoder's tokens/s.

    PYTHONPATH=. python benchmarks/gpu_decode_profile.py --batch 960 --prompt-len 80
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.gpu_extract import qwen7b
from tlpersona.decode import StaticGreedy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=960)
    ap.add_argument("--prompt-len", type=int, default=80)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--layers", default="7,14,21,27", help="captured layers ('' for none)")
    args = ap.parse_args()
    model = qwen7b(0)
    layers = [int(x) for x in args.layers.split(",") if x]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (args.batch, args.prompt_len), generator=g).tolist()
    dec = StaticGreedy(model, args.new_tokens, [2], 2, layers=layers)
    dec.capture(prompts)  # graph capture
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec.capture(prompts)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"{torch.cuda.get_device_name()}: batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, captured layers {layers}: {wall:.2f} s per batch = "
          f"{args.batch * args.new_tokens / wall:.0f} generated tok/s; "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    eager = StaticGreedy(model, 12, [2], 2, use_graphs=False, layers=layers)
    eager.capture(prompts)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eager.capture(prompts)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
