"""The whole study on one GPU, as a user runs it: ``tlpersona extract`` (generation of the
responses, extraction of all seven recipes at layers 7,14,21,27, the store) on a saved model
directory, against what a hand-written plain-HF script does (HF ``generate``, then one
``output_hidden_states`` forward over prompt + response), in the same run on the same card.

The model is the Qwen2.5-7B-Instruct architecture with random bf16 weights, saved once into a
model directory (speed does not depend on weight values; no hub is reachable). The tokenizer
directory given (ChatML template) is copied beside the weights. Random weights practically never
emit the end-of-turn token, so every response runs to ``--max-new-tokens``.

Each ``--run NAME:PERSONAS:FLAGS`` is one ``tlpersona extract`` through the CLI (in a child
process, so each starts with a clean card and its peak memory is its own). ``{out:NAME}`` in
FLAGS is replaced by that run's store directory. A run's fixed cost (model loads, graph capture)
is measured by the same command on 1 persona × 1 question (``--tiny``), and the 275 × 240
projection is ``fixed + (wall - fixed) × 275 / PERSONAS``.

    python benchmarks/gpu_e2e.py --tokenizer DIR --data ASSISTANT_AXIS_DIR --work /tmp/e2e \
        --run 'defaults:1:' --run 'b512:8:--batch-size 512' --plain-hf 2 \
        [--compare fused,twopass] [--nproc NAME:2] [--kill NAME:SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

LAYERS = [7, 14, 21, 27]
FULL_PERSONAS, N_QUESTIONS = 275, 240


def build_model(directory: Path, tokenizer_dir: str) -> None:
    """Random-weight Qwen2.5-7B architecture saved as a HF model directory with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config

    if (directory / "config.json").exists():
        return
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                      max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, directory)
    del model
    torch.cuda.empty_cache()


def child_cli(argv: list[str]) -> None:
    """One ``tlpersona extract`` through the CLI; prints its wall time and peak GPU memory."""
    from tlpersona.cli import main

    t0 = time.perf_counter()
    try:
        main(["extract", *argv], standalone_mode=False)
    finally:
        wall = time.perf_counter() - t0
        print(json.dumps({"wall": wall, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))


def child_plain_hf(model_dir: str, data: str, n_personas: int, batch: int, fwd_batch: int,
                   new_tokens: int) -> None:
    """A hand-written script: HF generate (left padded), then output_hidden_states forwards
    (right padded) read at the last prompt token, the prompt mean and the response mean."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: smoke test only
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev).eval()
    t_load = time.perf_counter() - t0
    from tlpersona.data import load_personas, load_questions

    prompts = []
    for persona in load_personas(data, n_personas):
        for q in load_questions(f"{data}/extraction_questions.jsonl"):
            msgs = [{"role": "system", "content": persona.system_prompts[0]},
                    {"role": "user", "content": q.text}]
            prompts.append(list(tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                        tokenize=True, return_dict=False)))
    pad = tok.pad_token_id or 0
    eos = tok.eos_token_id
    t1 = time.perf_counter()
    seqs = []
    with torch.no_grad():
        for a in range(0, len(prompts), batch):
            chunk = prompts[a:a + batch]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=eos)
            for p, row in zip(chunk, out[:, width:].tolist(), strict=True):
                resp = row[: row.index(eos) + 1] if eos in row else row
                seqs.append((p, resp))
        t_gen = time.perf_counter() - t1
        vecs = []
        for a in range(0, len(seqs), fwd_batch):
            chunk = seqs[a:a + fwd_batch]
            width = max(len(p) + len(r) for p, r in chunk)
            ids = torch.full((len(chunk), width), pad)
            pm = torch.zeros((len(chunk), width))
            rm = torch.zeros((len(chunk), width))
            mask = torch.zeros_like(ids)
            last = []
            for i, (p, r) in enumerate(chunk):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
                pm[i, : len(p)] = 1 / len(p)
                rm[i, len(p): len(p) + len(r)] = 1 / max(len(r), 1)
                last.append(len(p) - 1)
            hs = model(ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True).hidden_states
            pm, rm = pm.to(dev), rm.to(dev)
            for layer in LAYERS:
                h = hs[layer + 1].float()
                vecs.append((h[torch.arange(len(chunk)), torch.tensor(last)].cpu(),
                             torch.einsum("bs,bsd->bd", pm, h), torch.einsum("bs,bsd->bd", rm, h)))
        if dev == "cuda":
            torch.cuda.synchronize()
    t_all = time.perf_counter() - t1
    n_gen = sum(len(r) for _, r in seqs)
    print(json.dumps({"wall": t_load + t_all, "load": t_load, "generate": t_gen,
                      "forward": t_all - t_gen, "generated_tokens": n_gen,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))


def run_child(args: list[str], log: Path, nproc: int = 1, code: str | None = None) -> dict:
    """One child process; ``code``: a directory holding another version of the ``tlpersona``
    package, imported instead of this checkout's (a baseline in the same run)."""
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launch, __file__, *args]
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(code), env.get("PYTHONPATH", "")])
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"child {args[:2]} failed ({proc.returncode}):\n{proc.stdout}\n{tail}")
    return json.loads(lines[-1])


def kill_child(args: list[str], seconds: float, log: Path, code: str | None = None) -> int | None:
    """Start one child process and SIGKILL it after ``seconds`` (a run cut off mid-way)."""
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(code), env.get("PYTHONPATH", "")])
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.DEVNULL,
                                stderr=f, env=env)
        try:
            return proc.wait(timeout=seconds)  # finished before the kill: nothing to resume
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def generated_tokens(store: Path, n_personas: int) -> int:
    from tlpersona.data.responses import read_responses

    return sum(len(r.ids) for r in read_responses(store / "responses.jsonl").values())


def identical(a: Path, b: Path) -> bool:
    """Whether two stores hold bit-identical centroids and per-question vectors."""
    from tlpersona.cache import open_store

    sa, sb = open_store(a), open_store(b)
    return all(torch.equal(sa.centroids(p), sb.centroids(p))
               and (not sa.has_per_question(p) or torch.equal(sa.per_question(p), sb.per_question(p)))
               for p in sa.positions)


def min_cosine(a: Path, b: Path) -> dict[str, float]:
    """Minimum cosine between two stores' vectors, per position (per question where stored).
    Where ``b`` holds fewer personas or questions (a reference run with ``--limit-*``), ``a`` is
    cut to ``b``'s first ones; their names must agree."""
    from tlpersona.cache import open_store

    sa, sb = open_store(a), open_store(b)
    np_, nq = len(sb.personas), len(sb.questions)
    if sa.personas[:np_] != sb.personas or sa.questions[:nq] != sb.questions:
        raise SystemExit(f"{b} is not the first personas x questions of {a}")
    missing = sorted(set(sb.positions) ^ set(sa.positions))
    if missing:
        raise SystemExit(f"{a} and {b} hold different positions ({', '.join(missing)})")
    out = {}
    for pos in sb.positions:
        if sb.has_per_question(pos):
            x, y = sa.per_question(pos)[:np_, :nq].float(), sb.per_question(pos).float()
            valid = sa.valid(pos)[:np_, :nq] & sb.valid(pos)
            x, y = x[valid], y[valid]
        else:
            x, y = sa.centroids(pos)[:np_], sb.centroids(pos)
        out[pos] = float(torch.nn.functional.cosine_similarity(x, y, dim=-1).min())
    return out


def subset_responses(store: Path, dst: Path, personas: int, questions: int) -> None:
    """The header and the lines of the store's first ``personas`` personas and ``questions``
    questions of its responses file (extraction refuses responses it is not asked for)."""
    from tlpersona.cache import open_store

    st = open_store(store)
    names, qids = set(st.personas[:personas]), set(st.questions[:questions])
    keep = []
    for line in (store / "responses.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "persona" not in row or (row["persona"] in names and row["question_id"] in qids):
            keep.append(line)
    dst.write_text("\n".join(keep) + "\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-cli":
        return child_cli(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-hf":
        model_dir, data, n, batch, fwd, new = sys.argv[2:8]
        return child_plain_hf(model_dir, data, int(n), int(batch), int(fwd), int(new))
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", default="/tmp/e2e")
    ap.add_argument("--run", action="append", default=[], help="NAME:PERSONAS:FLAGS")
    ap.add_argument("--tiny", action="append", default=[],
                    help="NAME of a run whose fixed cost is measured on 1 persona x 1 question")
    ap.add_argument("--plain-hf", type=int, default=0, help="personas for the plain-HF script")
    ap.add_argument("--hf-batch", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--compare", action="append", default=[], help="NAME_A,NAME_B")
    ap.add_argument("--nproc", action="append", default=[],
                    help="NAME:N: run NAME (and its --tiny) under torchrun with N processes")
    ap.add_argument("--fit", action="append", default=[],
                    help="LABEL=SMALL,LARGE: two runs of one configuration at different persona "
                         "counts; the 275 x 240 time from the line through them (fixed costs and "
                         "anything that grows with the study, e.g. the store's finalisation)")
    ap.add_argument("--speedup", action="append", default=[],
                    help="FIT_A,FIT_B: ratio of two fits' projected 275 x 240 times")
    ap.add_argument("--reference", default=None,
                    help="RUN:PERSONAS:QUESTIONS: extract RUN's responses for its first personas "
                         "and questions in fp32 (two passes), and print every --against run's "
                         "min cosine to it: how far each bf16 path is from fp32")
    ap.add_argument("--against", action="append", default=[], help="NAME of a run for --reference")
    ap.add_argument("--kill", action="append", default=[],
                    help="NAME:SECONDS: SIGKILL run NAME that many seconds in, then run the same "
                         "command again (a resumed run; its wall time is the second command's)")
    ap.add_argument("--code", action="append", default=[],
                    help="NAME:DIR: run NAME (and its --tiny) with the tlpersona package in DIR "
                         "(e.g. the previous commit's) instead of this checkout's")
    args = ap.parse_args()
    if args.against and not args.reference:
        ap.error("--against needs --reference")
    if args.reference and len(args.reference.split(":")) != 3:
        ap.error("--reference is RUN:PERSONAS:QUESTIONS")
    nproc = {k: int(v) for k, v in (x.split(":") for x in args.nproc)}
    code = dict(x.split(":", 1) for x in args.code)
    kill = {k: float(v) for k, v in (x.split(":") for x in args.kill)}

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "qwen7b-random"
    t0 = time.perf_counter()
    build_model(model_dir, args.tokenizer)
    print(f"card: {torch.cuda.get_device_name()}; model dir ready in {time.perf_counter() - t0:.0f} s "
          f"(Qwen2.5-7B architecture, random bf16, {args.max_new_tokens} new tokens)", flush=True)
    questions = f"{args.data}/extraction_questions.jsonl"
    base = ["--model", str(model_dir), "--personas", args.data, "--questions", questions,
            "--positions", "all6", "--max-new-tokens", str(args.max_new_tokens)]
    outs: dict[str, Path] = {}
    results = {}
    for spec in args.run:
        name, n, flags = spec.split(":", 2)
        for key, path in outs.items():
            flags = flags.replace(f"{{out:{key}}}", str(path))
        out = work / f"store-{name}"
        shutil.rmtree(out, ignore_errors=True)
        fixed = None
        if name in args.tiny:
            tiny = work / f"store-{name}-tiny"
            shutil.rmtree(tiny, ignore_errors=True)
            r = run_child(["--child-cli", *base, "--limit-personas", "1", "--limit-questions", "1",
                           "--out", str(tiny), *shlex.split(flags)], work / f"{name}-tiny.log",
                          nproc.get(name, 1), code.get(name))
            fixed = r["wall"]
            shutil.rmtree(tiny, ignore_errors=True)
        argv = ["--child-cli", *base, "--limit-personas", n, "--out", str(out), *shlex.split(flags)]
        if name in kill:
            killed = kill_child(argv, kill[name], work / f"{name}-killed.log", code.get(name))
            print(f"[{name}] killed {kill[name]:.0f} s in (exit {killed}); resuming", flush=True)
        r = run_child(argv, work / f"{name}.log", nproc.get(name, 1), code.get(name))
        outs[name] = out
        n_gen = generated_tokens(out, int(n)) if "--responses" not in flags else 0
        line = (f"[{name}] {nproc.get(name, 1)} process(es)"
                + (f", code from {code[name]}" if name in code else "")
                + ": tlpersona extract --positions all6 "
                f"{flags or '(defaults)'}: "
                f"{n} personas x {N_QUESTIONS} questions, wall {r['wall']:.1f} s, "
                f"peak {r['peak_gib']:.1f} GiB")
        if n_gen:
            line += f", {n_gen} generated tokens ({n_gen / r['wall']:.0f} tok/s over the wall)"
        if fixed is not None:
            per = (r["wall"] - fixed) / int(n)
            proj = fixed + per * FULL_PERSONAS
            line += (f", fixed cost {fixed:.1f} s, {per:.2f} s/persona, projected 275 x 240: "
                     f"{proj / 60:.1f} min")
            if n_gen:
                line += f" ({n_gen / (r['wall'] - fixed):.0f} generated tok/s net of fixed cost)"
            r["projected_min"] = proj / 60
        print(line, flush=True)
        results[name] = r
    if args.plain_hf:
        r = run_child(["--child-hf", str(model_dir), args.data, str(args.plain_hf),
                       str(args.hf_batch), "64", str(args.max_new_tokens)], work / "plain-hf.log")
        per = (r["wall"] - r["load"]) / args.plain_hf
        proj = r["load"] + per * FULL_PERSONAS
        print(f"[plain-hf] HF generate (batch {args.hf_batch}) + output_hidden_states forward "
              f"(batch 64): {args.plain_hf} personas, wall {r['wall']:.1f} s (load {r['load']:.1f}, "
              f"generate {r['generate']:.1f} = {r['generated_tokens'] / r['generate']:.0f} tok/s, "
              f"forward {r['forward']:.1f}), peak {r['peak_gib']:.1f} GiB, projected 275 x 240: "
              f"{proj / 60:.1f} min", flush=True)
        results["plain-hf"] = {**r, "projected_min": proj / 60}
    for pair in args.compare:
        a, b = pair.split(",")
        cos = min_cosine(outs[a], outs[b])
        print(f"min cosine {a} vs {b} (every persona x question x layer): "
              + ", ".join(f"{k} {v:.5f}" for k, v in cos.items())
              + f"; overall {min(cos.values()):.5f}; bit-identical: {identical(outs[a], outs[b])}",
              flush=True)
    if args.reference:
        src, n_p, n_q = args.reference.split(":")
        ref = work / "store-reference"
        shutil.rmtree(ref, ignore_errors=True)
        resp = work / "reference-responses.jsonl"
        subset_responses(outs[src], resp, int(n_p), int(n_q))
        r = run_child(["--child-cli", *base, "--limit-personas", n_p, "--limit-questions", n_q,
                       "--dtype", "fp32", "--responses", str(resp), "--out", str(ref)],
                      work / "reference.log", code=code.get(src))
        print(f"[reference] fp32 two-pass extraction of {src}'s responses, {n_p} personas x {n_q} "
              f"questions: wall {r['wall']:.1f} s, peak {r['peak_gib']:.1f} GiB", flush=True)
        for name in args.against:
            cos = min_cosine(outs[name], ref)
            print(f"min cosine {name} vs fp32 reference: "
                  + ", ".join(f"{k} {v:.5f}" for k, v in cos.items())
                  + f"; overall {min(cos.values()):.5f}", flush=True)
    fits = {}
    for spec in args.fit:
        label, pair = spec.split("=", 1)
        small, large = pair.split(",")
        ns, nl = (int(next(r.split(":")[1] for r in args.run if r.split(":")[0] == x))
                  for x in (small, large))
        ts, tl = results[small]["wall"], results[large]["wall"]
        slope = (tl - ts) / (nl - ns)
        fits[label] = ts + slope * (FULL_PERSONAS - ns)
        print(f"[fit {label}] {small} ({ns} personas, {ts:.1f} s) and {large} ({nl}, {tl:.1f} s): "
              f"{slope:.3f} s/persona, intercept {ts - slope * ns:.1f} s, projected 275 x 240: "
              f"{fits[label] / 60:.2f} min", flush=True)
    for pair in args.speedup:
        a, b = pair.split(",")
        print(f"speedup {b} over {a} at 275 x 240 (projected): {fits[a] / fits[b]:.3f}x", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
