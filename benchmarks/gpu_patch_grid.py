"""A full patching grid on the Qwen2.5-7B architecture: exact (batched) and attribution.

The grid: every system-text position (``system``) + ``sys_end``, ``sys_end+1``, ``user_end``,
``last`` × all 28 layers × 8 persona pairs (assistant-axis personas against ``assistant``) × 4
questions, residual stream after each block. Timed through the API (exact with batched cells;
attribution of all five components from one backward per example) and through the CLI with its
default options (``tlpersona patch --method both``: exact + attribution + report). Baseline in
the same run on the same card: one cell per forward (TransformerLens's
``generic_activation_patch`` style) on the first example, projected to the grid; the batched
sweep on that example is compared with it cell by cell.

Random bf16 weights (speed does not depend on their values), saved once into a model directory
with the given tokenizer (ChatML template); no hub is reachable.

    python benchmarks/gpu_patch_grid.py --tokenizer DIR --data ASSISTANT_AXIS_DIR [--work /tmp/patch]
    python benchmarks/gpu_patch_grid.py --tokenizer DIR --data ASSISTANT_AXIS_DIR --tiny   # CPU check
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

POSITIONS = ["system", "sys_end", "sys_end+1", "user_end", "last"]


def build_model(directory: Path, tokenizer_dir: str, tiny: bool) -> None:
    """Random-weight Qwen2 model directory (``tiny``: a 4-layer fp32 model for the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    if (directory / "config.json").exists():
        return
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = (dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2) if tiny else
             dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4))
    cfg = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cpu" if tiny else "cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if tiny else torch.bfloat16)
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, directory)
    del model
    if not tiny:
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", default="/tmp/patch-grid")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="4-layer fp32 model on the CPU, 2 pairs x 1 question")
    ap.add_argument("--skip-cli", action="store_true")
    args = ap.parse_args()

    from tlpersona.cli import main as cli
    from tlpersona.data import load_personas, load_questions, system_prompt
    from tlpersona.interventions.attribution import attribute_example
    from tlpersona.interventions.patching import PatchConfig, expand_positions, patch_example, run_patching
    from tlpersona.interventions.runner import HOOKS, Runner
    from tlpersona.models.loading import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / ("qwen-tiny-random" if args.tiny else "qwen7b-random")
    n_pairs, n_q = (2, 1) if args.tiny else (args.pairs, args.questions)
    device, dtype = ("cpu", "fp32") if args.tiny else ("cuda", "bf16")
    build_model(model_dir, args.tokenizer, args.tiny)
    card = "CPU" if args.tiny else torch.cuda.get_device_name()
    personas = load_personas(args.data)
    base = next(p for p in personas if p.name == "assistant")
    clean = [p for p in personas if p.name != "assistant"][:n_pairs]
    qfile = f"{args.data}/extraction_questions.jsonl"
    questions = load_questions(qfile, n_q)

    model = load_model(str(model_dir), device=device, dtype=dtype)
    runner = Runner(model)
    n_layers = model.info.n_layers
    layers = list(range(n_layers))
    exact = PatchConfig(layers=layers, positions=POSITIONS, method="exact", progress=False)
    attrib = PatchConfig(layers=layers, positions=POSITIONS, method="attribution",
                         attribution_hooks=list(HOOKS), progress=False)
    print(f"card: {card}; {model_dir.name}, {n_layers} layers; {n_pairs} pairs x {n_q} questions",
          flush=True)

    # warm-up (kernels, allocator) on one example, not timed
    x = runner.conversation(system_prompt(clean[0], 0), questions[0].text)
    y = runner.conversation(system_prompt(base, 0), questions[0].text)
    rows = expand_positions(POSITIONS, [x])
    patch_example(runner, x, y, rows[-2:], PatchConfig(layers=layers[:2]))
    attribute_example(runner, x, y, rows, layers, list(HOOKS))
    sync()

    # baseline: one cell per forward on the first example, against the batched sweep
    t0 = time.perf_counter()
    single = patch_example(runner, x, y, rows, PatchConfig(layers=layers, max_rows=1))
    sync()
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = patch_example(runner, x, y, rows, exact)
    sync()
    t_batched = time.perf_counter() - t0
    n_fwd = sum(not v[4] for v in single.values())
    gap = max(abs(single[k][0] - batched[k][0]) / max(single[k][1], 1e-12) for k in single)
    print(f"example 1: {len(single)} cells ({n_fwd} need a forward); one cell per forward "
          f"{t_single:.2f} s, batched {t_batched:.2f} s ({t_single / t_batched:.1f}x); "
          f"largest |KL_batched - KL_single| / KL_corrupt = {gap:.2e}", flush=True)

    t0 = time.perf_counter()
    res_e = run_patching(runner, [base, *clean], questions, exact)
    sync()
    t_exact = time.perf_counter() - t0
    cells = sum(c.n for c in res_e.cells)
    print(f"[api] exact residual grid: {len(res_e.positions)} positions x {n_layers} layers x "
          f"{len(res_e.pairs)} pairs x {n_q} questions = {cells} cells: {t_exact:.1f} s "
          f"(one cell per forward, projected from example 1: "
          f"{t_single * len(res_e.pairs) * n_q:.0f} s)", flush=True)
    t0 = time.perf_counter()
    res_a = run_patching(runner, [base, *clean], questions, attrib)
    sync()
    t_attr = time.perf_counter() - t0
    print(f"[api] attribution, all of {', '.join(HOOKS)} ({sum(c.n for c in res_a.cells)} "
          f"cells): {t_attr:.1f} s", flush=True)
    if not args.tiny:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    del runner, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    if not args.skip_cli:
        out = work / "patch-cli"
        t0 = time.perf_counter()
        cli(["patch", "--model", str(model_dir), "--device", device, "--dtype", dtype,
             "--personas", args.data, "--questions", qfile, "--n-personas", str(n_pairs),
             "--n-questions", str(n_q), "--layers", "all", "--out", str(out)],
            standalone_mode=False)
        print(f"[cli] tlpersona patch --layers all (defaults: --method both, resid_post, all "
              f"components by attribution, report + figures): {time.perf_counter() - t0:.1f} s "
              "incl. model load", flush=True)


if __name__ == "__main__":
    main()
