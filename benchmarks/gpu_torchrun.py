"""Multi-GPU scaling of extraction under torchrun, and equality with a single-GPU run.

    torchrun --nproc-per-node 1 benchmarks/gpu_torchrun.py --tokenizer DIR --data DIR --out A
    torchrun --nproc-per-node 2 benchmarks/gpu_torchrun.py --tokenizer DIR --data DIR --out B
    python benchmarks/gpu_torchrun.py --compare A B

Each rank builds the Qwen2.5-7B architecture with the same seeded random bf16 weights on its
own GPU and extracts its share of the persona groups (all seven recipes, layers 7,14,21,27,
synthetic responses as in gpu_extract.py); rank 0 prints the wall time.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.gpu_extract import LAYERS, qwen7b, synthetic_responses


def run(args: argparse.Namespace) -> None:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    from tlpersona.chat.positions import parse_positions
    from tlpersona.data import load_assistant_axis_personas, load_questions_jsonl
    from tlpersona.extraction import ExtractConfig, extract_to_store
    from tlpersona.models.loading import LoadedModel, ModelInfo, use_hf_attention
    from tlpersona.runtime.distributed import ranks

    rk = ranks()
    device = rk.device()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    personas = load_assistant_axis_personas(args.data)[: args.personas]
    questions = load_questions_jsonl(f"{args.data}/extraction_questions.jsonl")[: args.questions]
    responses = synthetic_responses(personas, questions, tok.eos_token_id, 160, 0)
    with torch.device(device):
        model = qwen7b(0)
    bridge = TransformerBridge.boot_transformers("Qwen/Qwen2.5-7B-Instruct", hf_model=model,
                                                 tokenizer=tok, device=device, dtype=torch.bfloat16)
    use_hf_attention(bridge, model)
    loaded = LoadedModel(bridge, tok, ModelInfo("qwen7b-random", "config", "random-seed-0", 28, 3584),
                         device, torch.bfloat16)
    cfg = ExtractConfig(parse_positions("all6"), LAYERS, batch_size=64, progress=False)
    rk.barrier()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    extract_to_store(loaded, cfg, personas, questions, args.out, responses)
    torch.cuda.synchronize()
    if rk.main:
        print(f"{rk.world} GPU(s) [{torch.cuda.get_device_name()}]: {len(personas)} personas x "
              f"{len(questions)} questions in {time.perf_counter() - t0:.1f} s")


def compare(a: str, b: str) -> None:
    from tlpersona.cache import open_store

    sa, sb = open_store(a), open_store(b)
    worst = 0.0
    identical = True
    for pos in sa.positions:
        x, y = sa.centroids(pos), sb.centroids(pos)
        identical &= torch.equal(x, y)
        worst = max(worst, float((x - y).abs().max()))
        if sa.has_per_question(pos):
            identical &= torch.equal(sa.per_question(pos), sb.per_question(pos))
    print(f"stores {'bit-identical' if identical else 'differ'}; max |centroid diff| {worst:.3g}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--personas", type=int, default=32)
    ap.add_argument("--questions", type=int, default=240)
    ap.add_argument("--compare", nargs=2)
    a = ap.parse_args()
    if a.compare:
        compare(*a.compare)
    else:
        sys.exit(run(a))
