"""Extraction throughput on a GPU: all seven recipes at layers 7,14,21,27 from cached responses,
against a plain-HF sdpa forward over exactly the same token sequences, on the same card.

The model is the Qwen2.5-7B-Instruct architecture (28 layers, d_model 3584) with random bf16
weights built from its config (speed does not depend on weight values; no hub is reachable).
Prompts come from the assistant-axis persona and question files rendered with a ChatML
tokenizer (the embedded model's, whose ids are all valid for Qwen's larger vocabulary);
responses are seeded random token ids of realistic length ending in the end-of-turn token.

    python benchmarks/gpu_extract.py --tokenizer DIR --data ASSISTANT_AXIS_DIR \
        [--personas 16] [--batch-size 64]

Prints tokens/s for both, the ratio, peak GPU memory, and the projected wall time for the full
275 × 240 run (from the measured tokens per persona and tokens/s).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

from tlpersona.cache import open_store
from tlpersona.chat.positions import parse_positions
from tlpersona.chat.template import ChatRenderer
from tlpersona.data import load_assistant_axis_personas, load_questions_jsonl
from tlpersona.data.responses import Response
from tlpersona.extraction import ExtractConfig, Extractor, extract_to_store
from tlpersona.models.loading import LoadedModel, ModelInfo, use_hf_attention

LAYERS = [7, 14, 21, 27]


def qwen7b(seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                      max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def synthetic_responses(personas, questions, eos: int, mean_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in personas:
        for q in questions:
            n = int(torch.randint(mean_len // 2, mean_len * 3 // 2, (1,), generator=g))
            ids = torch.randint(100, 40000, (n,), generator=g).tolist() + [eos]
            out[(p.name, 0, q.id)] = Response(ids, True)
    return out


def plain_hf_seconds(seqs: list[list[int]], pad: int, batch_size: int,
                     check: list[tuple[list[int], int]]) -> tuple[float, torch.Tensor]:
    """Plain HF sdpa forward over the same sequences in the same length-sorted batches, with
    forward hooks reading the four layers (what a hand-written extraction script does).

    Also returns, for each ``(ids, index)`` in ``check``, the four layers at that token:
    ``[len(check), layer, d]``, an independent reference for the extracted vectors.
    """
    hf = qwen7b(0)
    with torch.no_grad():
        refs = []
        for ids, index in check:
            hs = hf(torch.tensor([ids]).cuda(), output_hidden_states=True).hidden_states
            refs.append(torch.stack([hs[layer + 1][0, index] for layer in LAYERS]).float().cpu())
    reference = torch.stack(refs)
    captured = []
    for layer in LAYERS:
        hf.model.layers[layer].register_forward_hook(
            lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))

    def run():
        for start in range(0, len(order), batch_size):
            batch = [seqs[i] for i in order[start:start + batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, s in enumerate(batch):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            with torch.no_grad():
                hf(ids.cuda(), attention_mask=mask.cuda())
            captured.clear()

    run()  # warm-up (kernels, allocator)
    return timed(run), reference


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--personas", type=int, default=16)
    ap.add_argument("--questions", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--resp-len", type=int, default=160)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = ap.parse_args()

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    all_personas = load_assistant_axis_personas(args.data)
    personas = all_personas[: args.personas]
    questions = load_questions_jsonl(f"{args.data}/extraction_questions.jsonl")[: args.questions]
    responses = synthetic_responses(personas, questions, tok.eos_token_id, args.resp_len, 0)
    renderer = ChatRenderer(tok)
    seqs = [renderer.prompt(p.system_prompts[0], q.text, responses[(p.name, 0, q.id)].ids).ids
            for p in personas for q in questions]
    n_tokens = sum(len(s) for s in seqs)
    print(f"card: {torch.cuda.get_device_name()}; Qwen2.5-7B architecture, random bf16 weights; "
          f"{len(personas)} personas x {len(questions)} questions = {len(seqs)} sequences, "
          f"{n_tokens} tokens (mean {n_tokens / len(seqs):.0f}); batch {args.batch_size}")

    # The "last" recipe of the first persona's first 8 questions, read independently from HF.
    check = []
    for q in questions[:8]:
        spans = renderer.prompt(personas[0].system_prompts[0], q.text)
        check.append((spans.ids, spans.prompt_len - 1))
    t_hf, reference = plain_hf_seconds(seqs, tok.pad_token_id or 0, args.batch_size, check)
    torch.cuda.empty_cache()

    # --- tlpersona: bridge, all seven recipes, question-invariant positions once per persona
    model = qwen7b(0)
    bridge = TransformerBridge.boot_transformers("Qwen/Qwen2.5-7B-Instruct", hf_model=model,
                                                 tokenizer=tok, device="cuda", dtype=torch.bfloat16)
    if args.attn == "sdpa":
        assert use_hf_attention(bridge, model)
    info = ModelInfo("qwen7b-random", "config", "random", 28, 3584)
    loaded = LoadedModel(bridge, tok, info, "cuda", torch.bfloat16)
    cfg = ExtractConfig(parse_positions("all6"), LAYERS, batch_size=args.batch_size, progress=False)
    ex = Extractor(loaded, cfg)

    tmp = tempfile.mkdtemp()
    ex.persona(personas[0], questions[: args.batch_size], responses)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    # the whole store path: extraction, part files, final stacking
    t_ours = timed(lambda: extract_to_store(loaded, cfg, personas, questions, f"{tmp}/store",
                                            responses))
    peak = torch.cuda.max_memory_allocated() / 2**30
    got = open_store(f"{tmp}/store").per_question("last")[0, :8].float()
    cos = torch.nn.functional.cosine_similarity(got, reference, dim=-1)
    shutil.rmtree(tmp)

    tps_hf, tps_ours = n_tokens / t_hf, n_tokens / t_ours
    per_persona = t_ours / len(personas)
    print(f"plain HF sdpa forward : {tps_hf:9.0f} tokens/s ({t_hf:.1f} s)")
    print(f"tlpersona all six     : {tps_ours:9.0f} tokens/s ({t_ours:.1f} s)  "
          f"= {100 * tps_ours / tps_hf:.1f} % of plain HF  [attn={args.attn}]")
    print(f"peak GPU memory (tlpersona): {peak:.1f} GiB")
    print(f"check vs plain HF hidden states ('last', 8 questions x 4 layers, bf16): "
          f"min cos {cos.min():.5f}")
    full = per_persona * 275 * (240 / len(questions))
    print(f"projected 275 x 240 wall time: {full / 60:.1f} min")


if __name__ == "__main__":
    main()
