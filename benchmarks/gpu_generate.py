"""Greedy generation throughput on a GPU: tlpersona's static-cache + CUDA-graph decoder against
plain HF ``generate`` (dynamic cache) at the same batch size, on the same prompts and card.

The model is the Qwen2.5-7B-Instruct architecture with random bf16 weights (speed does not
depend on weight values). Prompts are assistant-axis personas × questions rendered with a ChatML
tokenizer. Both decoders run ``--max-new-tokens`` steps (random weights practically never emit
the end-of-turn token). Also compares the generated ids row by row.

    PYTHONPATH=. python benchmarks/gpu_generate.py --tokenizer DIR --data ASSISTANT_AXIS_DIR \
        [--batch-sizes 64,256] [--max-new-tokens 200] [--batches 2]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from benchmarks.gpu_extract import qwen7b
from tlpersona.chat.template import ChatRenderer
from tlpersona.data import load_assistant_axis_personas, load_questions_jsonl
from tlpersona.extraction.generation import greedy_batch
from tlpersona.runtime.decode import StaticGreedy


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--batches", type=int, default=2, help="timed batches per batch size")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    personas = load_assistant_axis_personas(args.data)
    questions = load_questions_jsonl(f"{args.data}/extraction_questions.jsonl")
    renderer = ChatRenderer(tok)
    prompts = [renderer.prompt(p.system_prompts[0], q.text).ids
               for p in personas[:8] for q in questions]
    prompts.sort(key=len)  # length-sorted batches, as tlpersona generate makes them
    model = qwen7b(0)
    eos = [tok.eos_token_id]
    pad = tok.pad_token_id or 0
    n = args.max_new_tokens
    print(f"card: {torch.cuda.get_device_name()}; Qwen2.5-7B architecture, random bf16 weights; "
          f"greedy, {n} new tokens")
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        batches = [prompts[i * bs:(i + 1) * bs] for i in range(args.batches)]
        hf_out, ours_out = [], []
        greedy_batch(model, batches[0][:8], 4, eos, pad)  # warm-up
        t_hf = 0.0
        for b in batches:
            t, out = timed(partial(greedy_batch, model, b, n, eos, pad))
            t_hf += t
            hf_out += [r.ids for r in out]
        dec = StaticGreedy(model, n, eos, pad)
        torch.cuda.reset_peak_memory_stats()
        t_first, _ = timed(partial(dec, batches[0]))  # includes the one-off graph capture
        t_ours = 0.0
        for b in batches:
            t, out = timed(partial(dec, b))
            t_ours += t
            ours_out += out
        peak = torch.cuda.max_memory_allocated() / 2**30
        # the graph replays the eager step's kernels: it must not change a single token
        eager = StaticGreedy(model, n, eos, pad, use_graphs=False)(batches[0])
        graph_same = sum(a == b for a, b in zip(eager, ours_out[:bs], strict=True))
        # how much plain HF itself moves when only the batch composition changes
        half = [r.ids for r in greedy_batch(model, batches[0][: bs // 2], n, eos, pad)]
        hf_self = sum(a == b for a, b in zip(half, hf_out[: bs // 2], strict=True))
        tokens = sum(len(r) for r in hf_out)
        same = sum(a == b for a, b in zip(hf_out, ours_out, strict=True))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
                      for a, b in zip(hf_out, ours_out, strict=True)]
        diffs = [d for d in first_diff if d is not None]
        print(f"batch {bs}: HF generate {tokens / t_hf:8.0f} tok/s ({t_hf:.1f} s) | tlpersona "
              f"static+graphs {tokens / t_ours:8.0f} tok/s ({t_ours:.1f} s; first call with "
              f"capture {t_first:.1f} s) = {t_hf / t_ours:.2f}x | identical rows {same}/"
              f"{len(hf_out)}" + (f" (first divergence at token {min(diffs)}, median "
                                   f"{sorted(diffs)[len(diffs) // 2]})" if diffs else "")
              + f" | peak {peak:.1f} GiB")
        print(f"  graph vs eager static decoding: {graph_same}/{bs} identical rows; plain HF at "
              f"batch {bs // 2} vs {bs} on the same prompts: {hf_self}/{bs // 2} identical rows")
        dec._engines.clear()  # free this batch size's static caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
