"""What a decode step costs beyond its GEMMs, by batch size: the static decoder's step time in
graph replay (two decodes of different lengths over one fixed cache length, so that the prefill
cancels), the same rows' GEMMs alone (every block's projections and the LM head, captured in
one CUDA graph, with q/k/v and gate/up as separate or as merged GEMMs), and the number of
kernels one eager step launches. Qwen2.5-7B architecture, random bf16 weights.

    PYTHONPATH=. python benchmarks/gpu_step_anatomy.py --batches 256,512,768,1024
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.gpu_extract import qwen7b
from tlpersona.runtime.decode import StaticGreedy


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call of ``fn`` captured in a CUDA graph (median of ``reps`` replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def gemms(model: torch.nn.Module, rows: int, merged: bool):
    """A function running one step's GEMMs at ``rows`` rows (outputs discarded)."""
    blocks = model.model.layers
    x = torch.randn(rows, model.config.hidden_size, device="cuda", dtype=model.dtype)
    h = torch.randn(rows, model.config.intermediate_size, device="cuda", dtype=model.dtype)
    cat = []
    if merged:
        for b in blocks:
            a, m = b.self_attn, b.mlp
            cat.append((torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                        torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                        torch.cat([m.gate_proj.weight, m.up_proj.weight])))

    def run() -> None:
        for i, b in enumerate(blocks):
            a, m = b.self_attn, b.mlp
            if merged:
                w, bias, gu = cat[i]
                F.linear(x, w, bias)
                F.linear(x, gu)
            else:
                a.q_proj(x), a.k_proj(x), a.v_proj(x)
                m.gate_proj(x), m.up_proj(x)
            a.o_proj(x)
            m.down_proj(h)
        model.lm_head(x)
    return run


def step_ms(model: torch.nn.Module, batch: int, prompt_len: int, layers: list[int]) -> float:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (batch, prompt_len), generator=g).tolist()
    walls = {}
    for n in (40, 200):
        dec = StaticGreedy(model, n, [2], 2, layers=layers, cache_len=320)
        dec.capture(prompts)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dec.capture(prompts)
        torch.cuda.synchronize()
        walls[n] = time.perf_counter() - t0
        del dec
        torch.cuda.empty_cache()
    return (walls[200] - walls[40]) / 160 * 1e3


def kernels_per_step(model: torch.nn.Module, batch: int, prompt_len: int, layers: list[int]) -> int:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (batch, prompt_len), generator=g).tolist()
    counts = []
    for n in (4, 12):
        dec = StaticGreedy(model, n, [2], 2, use_graphs=False, layers=layers, cache_len=320)
        dec.capture(prompts)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            dec.capture(prompts)
            torch.cuda.synchronize()
        counts.append(sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA"))
        del dec
    return (counts[1] - counts[0]) // 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="256,512,768,1024")
    ap.add_argument("--prompt-len", type=int, default=80)
    ap.add_argument("--layers", default="7,14,21,27")
    ap.add_argument("--count-kernels", action="store_true")
    args = ap.parse_args()
    model = qwen7b(0)
    layers = [int(x) for x in args.layers.split(",") if x]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; prompt {args.prompt_len}, "
          f"cache 320, captured layers {layers}")
    if args.count_kernels:
        print(f"kernels per eager step (batch 512): "
              f"{kernels_per_step(model, 512, args.prompt_len, layers)}", flush=True)
    for b in (int(x) for x in args.batches.split(",")):
        step = step_ms(model, b, args.prompt_len, layers)
        sep = graph_ms(gemms(model, b, merged=False))
        mer = graph_ms(gemms(model, b, merged=True))
        print(f"batch {b:5d}: step {step:6.2f} ms ({b / step * 1e3:8.0f} tok/s); GEMMs alone "
              f"{sep:6.2f} ms separate, {mer:6.2f} ms merged q/k/v + gate/up "
              f"({b / mer * 1e3:8.0f} tok/s); rest {step - sep:5.2f} ms", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
