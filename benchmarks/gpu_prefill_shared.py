"""The prefill with and without shared prompt prefixes: the static decoder's prefill of real
study prompts (assistant-axis personas × questions in the tokenizer's chat template, batched as
fused extraction batches them: sorted by length), on the Qwen2.5-7B architecture with random
bf16 weights. Times one batch's prefill both ways (the same engine, median of repeats), counts
the prompt tokens each runs, and compares the two prefills' residuals at every real prompt
position of the captured layers.

    PYTHONPATH=. python benchmarks/gpu_prefill_shared.py --tokenizer DIR --data ASSISTANT_AXIS_DIR
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.gpu_extract import qwen7b
from tlpersona.chat.template import ChatRenderer, common_prefix_len
from tlpersona.data import load_personas, load_questions
from tlpersona.runtime.decode import StaticGreedy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--personas", type=int, default=8)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    renderer = ChatRenderer(AutoTokenizer.from_pretrained(args.tokenizer))
    personas = load_personas(args.data, args.personas)
    questions = load_questions(f"{args.data}/extraction_questions.jsonl")
    prompts, shared = [], []
    for p in personas:
        rows = [renderer.prompt(p.system_prompts[0], q.text).ids for q in questions]
        k = common_prefix_len(rows)
        prompts += rows
        shared += [k] * len(rows)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = [order[a:a + args.batch] for a in range(0, len(order), args.batch)]
    model = qwen7b(0)
    dec = StaticGreedy(model, 1, [2], 2, layers=[7, 14, 21, 27])
    with torch.no_grad():
        for idx in batches[:1] + batches[len(batches) // 2: len(batches) // 2 + 1]:
            ps, sh = [prompts[i] for i in idx], [shared[i] for i in idx]
            w = max(len(p) for p in ps)
            times: dict[str, list[float]] = {"full": [], "shared": []}
            caps = {}
            for _ in range(args.repeats):
                for name, s in (("full", None), ("shared", sh)):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    cap = dec.capture(ps, shared=s)
                    torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - t0)
                    caps[name] = [x.clone() for x in cap.prefill], cap.pads
            (full, pads), (mine, _) = caps["full"], caps["shared"]
            cos = min(float(torch.nn.functional.cosine_similarity(
                f[i, pads[i]:].float(), m[i, pads[i]:].float(), dim=-1).min())
                for f, m in zip(full, mine, strict=True) for i in range(len(ps)))
            keep = [min(k, len(p) - 1) for p, k in zip(ps, sh, strict=True)]
            c0 = min(w - len(p) + k for p, k in zip(ps, keep, strict=True))
            distinct = len({tuple(p[:k]) for p, k in zip(ps, keep, strict=True)})
            tokens = distinct * max(keep) + len(ps) * (w - c0)
            t_full, t_shared = statistics.median(times["full"]), statistics.median(times["shared"])
            print(f"{torch.cuda.get_device_name()}: batch {len(ps)} (width {w}, {distinct} distinct "
                  f"prefixes, shared {min(keep)}-{max(keep)} tokens): full prefill {t_full * 1e3:.1f} ms "
                  f"over {len(ps) * w} tokens, shared {t_shared * 1e3:.1f} ms over {tokens} "
                  f"({t_full / t_shared:.2f}x); min cosine shared vs full over every real prompt "
                  f"position and captured layer {cos:.5f}", flush=True)


if __name__ == "__main__":
    main()
